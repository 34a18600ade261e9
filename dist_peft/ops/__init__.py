"""Numerical kernels shared by the methods: small pure functions, tensors in and tensors out."""

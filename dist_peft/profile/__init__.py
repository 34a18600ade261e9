"""The throughput profiler (``dist-peft profile``, docs/profiling.md): per step and per rank, where the time
(``timer``), the collectives (``comm``), the memory (``memory``), the FLOPs (``flops``, on
``dist_peft.accounting``) and the GPU's power (``nvml``) go; a bounded trace (``trace``); reports (``report``,
``plots``); several configurations interleaved against the frozen floor (``run``, ``interleave``).
Kept import-light: the training loop imports ``timer`` only."""

"""The training job: config, data, loop with method hooks, checkpoint/resume, export."""

"""Where the models live: the memory planner (full / offload / stream), moving modules between host and
GPU and streaming blocks."""

"""How the experts run: fp8 layers, attention kernels and compile, the T5 text encoder, the flow
schedules and LoRA adapters."""

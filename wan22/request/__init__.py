"""What a request is, checked without torch: parameters (spec), limits, image intake, files, errors,
LoRA and model-set names. headless/ and runpod_worker/ import only this part of the engine (tests/test_layout.py)."""

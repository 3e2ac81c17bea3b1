"""Inference runtime: ONNX Runtime sessions (:mod:`.sessions`), the detect-crop-classify-blend pipeline
(:mod:`.pipeline`) and its benchmark (:mod:`.bench`). The plain torch path runs the same pipeline for comparison."""

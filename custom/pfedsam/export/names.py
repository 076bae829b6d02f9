"""File names and choices of the export layer, importable without torch or onnx (the CLI parser uses them)."""

OPSET = 17
ENCODER_FILE = "image_encoder.onnx"
DECODER_FILE = "mask_decoder.onnx"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
PROMPTS = ("none", "box")
ENGINES = ("torch", "onnx", "tensorrt")

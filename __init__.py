"""comfyui-wan22-i2v: Wan2.2 I2V-A14B nodes for ComfyUI (clone into ComfyUI/custom_nodes/)."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# web/: frontend extensions (2024 frontend: integer widgets that step from their minimum, the MP4 preview;
# Vue frontend: template cards with titles)
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

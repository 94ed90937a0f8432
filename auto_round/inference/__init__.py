"""Loading auto_round checkpoints: QuantLinear and the hooks transformers' AutoRoundQuantizer calls.

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("quantized-dir")   # calls convert_hf_model / post_init
"""

from .checkpoint_check import CheckpointError, UnsupportedCheckpointError, validate_checkpoint
from .convert_model import convert_hf_model, infer_target_device, post_init, resolve_packing
from .layer_match import LayerQuantSpec, build_layer_specs
from .qlinear import QuantLinear

__all__ = [
    "CheckpointError",
    "UnsupportedCheckpointError",
    "validate_checkpoint",
    "QuantLinear",
    "LayerQuantSpec",
    "build_layer_specs",
    "convert_hf_model",
    "infer_target_device",
    "post_init",
    "resolve_packing",
]

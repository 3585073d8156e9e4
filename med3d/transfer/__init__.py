"""Transfer toolkit: read foreign weights, inflate 2D to 3D, adapt channels, init policies.

Everything here except ``load_pretrained`` is a pure function on tensors or state dicts.
"""
from .channels import adapt_input_conv, map_input_channels  # noqa: F401
from .inflate import inflate_state_dict  # noqa: F401
from .policies import first_k_stages, init_state_dict, mean_var  # noqa: F401
from .load import LoadReport, load_pretrained  # noqa: F401
from .formats import describe_state_dict, detect_source, read_weights, upgrade_metadata  # noqa: F401
from .pretrained import PretrainedCfg, find_pretrained_cfg, pretrained_cfgs, structure_mismatch  # noqa: F401

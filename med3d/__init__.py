"""med3d: Med3D-style 3D-ResNet pretraining across datasets and transfer to new organ tasks."""
__version__ = "0.1.0"

from .api import create_encoder, create_model, list_encoders  # noqa: E402
from .errors import Med3DError  # noqa: E402
from .inference import predict  # noqa: E402
from .transfer import inflate_state_dict, load_pretrained  # noqa: E402

__all__ = ["__version__", "create_encoder", "create_model", "list_encoders", "load_pretrained",
           "inflate_state_dict", "Med3DError", "predict"]

"""captioner: image captioning with a pretrained CNN encoder and a recurrent decoder."""

from captioner.api import Caption, Captioner
from captioner.decoding import DecodingOptions

__all__ = ["Caption", "Captioner", "DecodingOptions"]
__version__ = "0.1.0"

"""prefixtune: Prefix-Tuning (Li & Liang, 2021) for any frozen Hugging Face LM."""

__version__ = "0.1.0"

from .models import load_base_model  # noqa: E402
from .config import PrefixConfig  # noqa: E402
from .prefix import Prefix  # noqa: E402
from .tuner import PrefixTuner  # noqa: E402
from .generate import generate, score  # noqa: E402

__all__ = ["load_base_model", "Prefix", "PrefixConfig", "PrefixTuner", "generate", "score", "__version__"]

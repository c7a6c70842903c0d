"""Where the project caches what it makes (synthetic data, pretrained backbones)."""
import os


def cache_dir(name: str) -> str:
    """``$MASK2FORMER_SIM_CACHE/<name>``, else ``~/.cache/mask2former_sim/<name>`` (absolute)."""
    base = os.environ.get("MASK2FORMER_SIM_CACHE") or os.path.join("~", ".cache", "mask2former_sim")
    return os.path.join(os.path.abspath(os.path.expanduser(base)), name)

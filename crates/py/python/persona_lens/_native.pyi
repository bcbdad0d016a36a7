"""Type stubs of the compiled module (see persona_lens/__init__.py for the analyses)."""

from os import PathLike
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str
DEFAULT_MODEL: str

Prompts = Union[str, Sequence[str], Sequence[Sequence[int]]]
HookFn = Callable[[npt.NDArray[np.float32], "Hook"], Optional[npt.ArrayLike]]
FwdHooks = Sequence[Tuple[str, Union["HookOp", HookFn]]]

class PersonaLensError(ValueError):
    """A bad input or a failed run; the message is the command line's one-line error."""

class Hook:
    """What a Python hook function receives beside the activation."""
    name: str
    layer: Optional[int]
    pad: List[int]
    start: int

class HookOp:
    """A fast hook operation (made by add / replace / zero / scale)."""

def add(value: npt.ArrayLike, *, rows: Optional[Sequence[int]] = None, positions: Optional[Sequence[int]] = None,
        heads: Optional[Sequence[int]] = None) -> HookOp:
    """x + value (broadcast) where the selector applies."""

def replace(value: npt.ArrayLike, *, rows: Optional[Sequence[int]] = None, positions: Optional[Sequence[int]] = None,
            heads: Optional[Sequence[int]] = None) -> HookOp:
    """The activation replaced by value (broadcast) where the selector applies."""

def zero(*, rows: Optional[Sequence[int]] = None, positions: Optional[Sequence[int]] = None,
         heads: Optional[Sequence[int]] = None) -> HookOp:
    """Zero ablation where the selector applies."""

def scale(factor: float, *, rows: Optional[Sequence[int]] = None, positions: Optional[Sequence[int]] = None,
          heads: Optional[Sequence[int]] = None) -> HookOp:
    """x * factor where the selector applies."""

class ActivationCache:
    """Activations by hook name: float32 arrays [n_prompts, positions, ...]; index p = prompt
    position p, zeros past each prompt's end; cache["resid_post", 3] works as in TransformerLens."""
    prompt_lengths: List[int]
    positions: str
    def __getitem__(self, key: Union[str, Tuple[str, int]]) -> npt.NDArray[np.float32]: ...
    def __contains__(self, key: Union[str, Tuple[str, int]]) -> bool: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[str]: ...
    def keys(self) -> List[str]: ...
    def items(self) -> List[Tuple[str, npt.NDArray[np.float32]]]: ...
    def to_dict(self) -> Dict[str, npt.NDArray[np.float32]]: ...
    def stack(self, short: str) -> npt.NDArray[np.float32]: ...

class Model:
    """A model: a .gguf file, a Hugging Face directory, a registry short name or a hub id."""
    def __init__(self, name_or_path: str = ..., *, dtype: str = "f32", quantized: Union[bool, str, None] = None,
                 threads: Optional[int] = None, models_dir: Union[str, PathLike, None] = None) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def cfg(self) -> Dict[str, Any]: ...
    def tokenize(self, text: str, *, chat: bool = False, prepend_bos: bool = True) -> List[int]: ...
    def to_str_tokens(self, ids: Sequence[int]) -> List[str]: ...
    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str: ...
    def hook_names_matching(self, pattern: str = "*") -> List[str]: ...
    def run_with_cache(self, input: Prompts, *, names: Union[str, Sequence[str], None] = None, positions: str = "all",
                       chat: bool = False, batch_size: int = 16, logits: Optional[str] = "last"
                       ) -> Tuple[Optional[npt.NDArray[np.float32]], ActivationCache]: ...
    def run_with_hooks(self, input: Prompts, *, fwd_hooks: Optional[FwdHooks] = None,
                       names: Union[str, Sequence[str], None] = None, return_cache: bool = False,
                       positions: str = "all", chat: bool = False, batch_size: int = 16,
                       logits: Optional[str] = "last") -> Any: ...
    def generate(self, input: Prompts, *, max_new_tokens: int = 32, chat: bool = False,
                 temperature: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 seed: int = 0, stop_at_eos: bool = True, use_kv_cache: bool = True,
                 fwd_hooks: Optional[FwdHooks] = None) -> Union[str, List[str]]: ...
    def add_hook(self, name: str, op: Union[HookOp, HookFn]) -> None: ...
    def reset_hooks(self) -> None: ...

def run_job(model: Model, job: str, kwargs: Optional[Dict[str, Any]] = None) -> str: ...
def run_study(kwargs: Optional[Dict[str, Any]] = None) -> str: ...
def run_command(command: str, kwargs: Optional[Dict[str, Any]] = None) -> str: ...
def encode(crosscoder: str, x: npt.ArrayLike, use_threshold: bool = True
           ) -> Tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]: ...
def read_store(store: str) -> Tuple[npt.NDArray[np.float32], str]: ...

class PairHarvester:
    """A worker's harvester: `diff harvest`'s flags as a dict; loads the model pair and builds
    the corpus once, then harvests parts ("I/N") into a store folder."""
    def __init__(self, kwargs: Optional[Dict[str, Any]] = None) -> None: ...
    @property
    def n_samples(self) -> int: ...
    def part(self, shard: str, out: Union[str, PathLike], resume: bool = True) -> str: ...

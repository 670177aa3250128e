"""Loss functions by name, shared by the DPO and SFT extension points (`dpo_losses`, `sft_losses`)."""

import warnings
from collections.abc import Callable


class LossRegistry:
    """Registrations (objects with the loss function as `fn`) by name; TRL's own names are reserved."""

    def __init__(self, kind: str, reserved: tuple[str, ...]):
        self.kind, self.reserved, self.entries = kind, reserved, {}

    def decorator(self, name: str, make_entry: Callable) -> Callable[[Callable], Callable]:
        """A decorator that registers `make_entry(fn)` as `name` and returns `fn`; replacing another function warns
        (re-running a notebook cell)."""
        if name in self.reserved:
            raise ValueError(f"`{name}` is one of TRL's own {self.kind} loss types and cannot be registered again.")

        def register(fn: Callable) -> Callable:
            previous = self.entries.get(name)
            if previous is not None and previous.fn is not fn:
                warnings.warn(f"Replacing the {self.kind} loss `{name}` ({previous.fn.__qualname__}) with "
                              f"{fn.__qualname__}.", stacklevel=2)
            self.entries[name] = make_entry(fn)
            return fn

        return register

    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def __getitem__(self, name: str):
        return self.entries[name]

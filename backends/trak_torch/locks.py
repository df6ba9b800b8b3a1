"""One gradient pass at a time per ``nn.Module``: the torch backend's calls lend the model to one thread.

One job: a lock per model object. Every gradient path changes the module while it runs: ``functional_call`` swaps
each checkpoint's tensors into its parameters (under ``vmap``: tensors wrapped for that thread's transform),
``eval_mode`` sets and restores its ``training`` flags, the closed form and the factorized projection register
forward hooks on its layers, and Hugging Face models get their attention implementation set. Two threads doing
so on the same module at once (one estimator scored from two threads, or two estimators sharing a model) read each
other's parameters and hooks: wrong scores, shape errors, a model left in eval mode. Calls on different models run
in parallel; the projection, the kernel solves and the stores are outside the lock.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any

__all__ = ["model_lock"]

_locks: dict[int, threading.RLock] = {}  # id(model) -> its lock, dropped when the model is collected
_guard = threading.Lock()


def model_lock(model: Any) -> threading.RLock:
    """The lock the torch backend holds while it runs ``model`` (re-entrant: its checks call it again).

    Parameters
    ----------
    model : torch.nn.Module
        The model (a ``torch.compile``'d one shares the lock of the module it compiled).

    Returns
    -------
    threading.RLock
        The same lock for the same module object, as long as it lives. Hold it to run the model in a thread of
        your own while trak-core may use it in another (or give that thread ``copy.deepcopy(model)``).
    """
    if type(model).__name__ == "OptimizedModule":  # torch.compile's wrapper runs the module it holds
        model = getattr(model, "_orig_mod", model)
    key = id(model)
    lock = _locks.get(key)
    if lock is None:
        with _guard:
            lock = _locks.get(key)
            if lock is None:
                lock = _locks[key] = threading.RLock()
                weakref.finalize(model, _locks.pop, key, None)  # before the id can be reused
    return lock

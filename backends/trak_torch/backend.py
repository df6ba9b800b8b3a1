"""The PyTorch backend object: ownership, checkpoints, per-example gradients, projection.

Per-example gradients are computed in closed form where the model's layers allow it
(``trak_torch.closed_form``), else as ``vmap(grad(f))`` over chunks of a batch with ``torch.func``,
where ``f`` is the task output of one example computed with ``functional_call``; parameters
outside ``params`` and buffers enter as constants (never differentiated). The model runs in
eval mode (BatchNorm uses its running statistics, dropout is off) and its mode is restored after.
The logits are taken from what ``forward`` returns by ``output_logits``.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Mapping, Sequence

from trak_core.backends import Backend
from trak_core.errors import TrakTypeError, TrakValueError
from trak_core.fingerprints import parameters_digest

from .attention import (attention_for_closed_form, attention_for_vmap, causal_model, model_masks, note_mask,
                        reads_own_mask, uncounted_pad_predictions)
from .checkpoint import TorchCheckpoint, module_classes, prepared_dtype, raise_dtype_error, select_names, snapshot
from .contexts import check_context
from .locks import model_lock
from .looped import eval_mode, looped_gradients, refuse_to_loop, vmap_cannot_batch
from .mask_check import check_replaced_mask
from .outputs import _rows, batch_logits, check_labels, output_logits
from .vmapped import vmap_in_attention
from .seq2seq import check_task, is_encoder_decoder, with_decoder_inputs

__all__ = ["TorchBackend", "output_logits"]


class TorchBackend(Backend):
    """Per-example gradients for ``torch.nn.Module`` models.

    Parameters
    ----------
    params : sequence of str or callable, optional
        Parameters to attribute through: names from ``model.named_parameters()`` or a predicate
        ``(name, tensor) -> bool``. Default: all. The gradient vector follows
        ``named_parameters()`` order, each tensor flattened row-major.
    chunk_size : int, optional
        Examples per ``vmap`` call (memory stays ``O(chunk_size * p)``). Default (``chunk_rows``):
        on CPUs as many as fit in 256 MiB of gradients; on GPUs as many as fit in an eighth of
        the device's free memory, at most 6 GiB of gradients; at most 256 either way.
    logits_fn : callable, optional
        ``forward``'s output -> the logits tensor ``(batch, n_outputs)``. Default: the rule of
        ``output_logits`` (a tensor; a tuple's first element; a mapping's or a Hugging Face
        ``ModelOutput``'s ``"logits"``; an object's ``.logits``). It runs on the whole batch and,
        under ``vmap``, on one example, so it must only select or reshape, not mix rows.

    attention_mask : {"auto", "causal", "bidirectional", "pass"}
        What a dict batch's 2-D ``attention_mask`` (padding: 1 keep, 0 pad) becomes before the model
        sees it: an additive 4-D mask ``(n, 1, T, T)`` in the model's dtype, which Hugging Face models
        take as it is (their own 2-D handling branches on the mask's values, which ``vmap`` cannot
        follow). ``"auto"``: causal for decoders (``config.is_decoder``, ``*ForCausalLM``,
        ``*LMHeadModel``, attention modules with ``is_causal``, also inside a wrapper), windowed for
        sliding-window layers, bidirectional otherwise, for Hugging Face models (a model that is none and
        holds none gets its mask as it is, as do CLIP's text tower and its kin, which build their own causal
        mask); ``"pass"`` hands the 2-D mask over unchanged. Under ``"auto"`` a model's per-example outputs
        with the 4-D mask are compared with its own on its first batch and its first padded one: where they
        differ by more than ``sqrt(eps)`` (relative), or it raises with the 4-D mask and runs with its own (OPT,
        Bloom, XLM), it gets its mask as it is from then on, with a warning (``trak_torch.mask_check``).
        For an encoder-decoder model (``config.is_encoder_decoder``), it masks keys only,
        ``(n, 1, 1, T)``, as the encoder's self-attention and the decoder's cross-attention both read it.

    per_example : {"auto", "vmap", "loop"}
        How per-example gradients are computed. ``"auto"``: in closed form (one batched backward
        pass, ``trak_torch.closed_form``) when every attributed parameter belongs to a Linear,
        Conv1d/Conv2d, Embedding, Conv1D, BatchNorm (running statistics), LayerNorm, GroupNorm, RMSNorm or
        Hugging Face ``*RMSNorm`` layer and the first two examples of a checkpoint agree with plain autograd
        one example at a time; otherwise ``vmap(grad)``. ``"vmap"``: always ``vmap(grad)``. ``"loop"``: plain
        autograd one example at a time (slow; what ``"auto"`` and ``"vmap"`` switch to, with a warning, for a
        model ``vmap`` cannot batch: ``nn.GRU``, ``torch.utils.checkpoint``).

    Notes
    -----
    Encoder-decoder models (T5, BART) take ``task="seq2seq"``; a dict batch without
    ``decoder_input_ids`` gets them from the labels (``trak_torch.seq2seq``).

    Under ``vmap``, Hugging Face models run eager attention (set back after; SDPA's backward has no batching rule),
    but float64 models keep their SDPA: eager attention's softmax is float32 (``attention.attention_for_vmap``).

    A floating batch whose dtype differs from the model's parameters (float64 inputs to a float32
    model) is a ``TypeError`` that names both dtypes and the fix; nothing is cast silently.
    """

    name = "torch"
    framework = "torch"
    extra = "torch"
    can_gradients = True
    has_fused_projection = False  # project() is the core's (tensor cores on CUDA: trak_core._split)
    can_factorize = True  # proj_type="kronecker": trak_torch.kronecker

    def __init__(self, params: Sequence[str] | Callable[[str, Any], bool] | None = None,
                 chunk_size: int | None = None, logits_fn: Callable[[Any], Any] | None = None,
                 attention_mask: str = "auto", per_example: str = "auto") -> None:
        if per_example not in ("auto", "vmap", "loop"):
            raise TrakValueError(f"per_example must be 'auto', 'vmap' or 'loop', got {per_example!r}")
        self.per_example = per_example
        if attention_mask not in ("auto", "causal", "bidirectional", "pass"):
            raise TrakValueError(f"attention_mask must be 'auto', 'causal', 'bidirectional' or 'pass', got "
                                 f"{attention_mask!r}")
        self.attention_mask = attention_mask
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
            raise TrakValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if logits_fn is not None and not callable(logits_fn):
            raise TrakTypeError(f"logits_fn must be a function (model output -> logits tensor), got "
                                f"{type(logits_fn).__name__}")
        self.params, self.chunk_size, self.logits_fn = params, chunk_size, logits_fn

    def owns(self, model: Any) -> bool:
        """Whether ``model`` is a ``torch.nn.Module`` (``False`` while torch is not imported: never imports it)."""
        torch = sys.modules.get("torch")
        return torch is not None and isinstance(model, torch.nn.Module)

    def prepare(self, model: Any, checkpoint: Any) -> TorchCheckpoint:
        """A ``TorchCheckpoint``: a copy of a ``state_dict`` (``None``: the model's state) in the model's dtypes and
        on its device, split into the attributed parameters (``params``) and the frozen rest."""
        import torch

        if not isinstance(model, torch.nn.Module):
            raise TrakTypeError(f"the torch backend needs a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, torch.jit.ScriptModule):
            raise TrakTypeError("a TorchScript module (torch.jit.script or trace) cannot be called with other "
                                "parameters (torch.func.functional_call): pass the eager nn.Module it was made from")
        if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            raise TrakTypeError(f"a {type(model).__name__} wrapper cannot be called with other parameters "
                                "(torch.func.functional_call): pass the model it wraps, model.module (and its "
                                "state_dict, whose keys have no 'module.' prefix)")
        check_context(next(model.parameters(), torch.empty(0)).device)
        with model_lock(model):  # another thread's functional_call would have swapped its parameters
            return snapshot(model, checkpoint, select_names(model, self.params))

    def model_lock(self, model: Any) -> Any:
        """The lock this backend holds while it runs ``model`` (``trak_torch.locks.model_lock``): a caller that takes
        it before a lock of its own (``TRAK.open``'s loading) keeps one order of the two."""
        return model_lock(model)

    def n_params(self, prepared: TorchCheckpoint) -> int:
        """Elements of the attributed parameters (``params``)."""
        return prepared.n_params

    def model_identity(self, model: Any) -> str:
        """See ``Backend.model_identity``: the classes of the model's modules (``checkpoint.module_classes``)."""
        return module_classes(model)

    def parameters_digest(self, prepared: TorchCheckpoint) -> str:
        """SHA-256 of the attributed parameters and of the frozen ones and buffers (they change outputs too)."""
        return parameters_digest(list(prepared.params.items()) + sorted(prepared.frozen.items()))

    def _check_batch(self, prepared: TorchCheckpoint, inputs: Any, labels: Any) -> None:
        import torch

        named = [(f"inputs[{key!r}]", value) for key, value in inputs.items()] if isinstance(inputs, Mapping) \
            else [("inputs", inputs)]
        for what, tensor in named + [("labels", labels)]:
            if not isinstance(tensor, torch.Tensor):
                raise TrakTypeError(f"the torch backend needs {what} as torch tensors, got {type(tensor).__name__}; "
                                    "convert the batch, e.g. torch.as_tensor(array) (a DataLoader does it for you)")
            if tensor.device != prepared.device:
                raise TrakValueError(f"{what} are on {tensor.device} but the model is on {prepared.device}; "
                                     f"move the batch to the model's device (tensor.to({str(prepared.device)!r}))")

    def _batch(self, model: Any, prepared: TorchCheckpoint, inputs: Any, labels: Any, task: Any,
               causal: bool) -> tuple[Any, Any]:
        """The checked batch's inputs as the model takes them (an encoder-decoder model's decoder inputs made from
        the labels when the batch has none: ``trak_torch.seq2seq``) and its labels (a causal LM's predictions made at
        padding positions not counted: ``attention.uncounted_pad_predictions``); ``causal``: the call's ``_causal``."""
        self._check_batch(prepared, inputs, labels)
        check_task(model, task, causal)
        inputs, labels = (with_decoder_inputs(model, inputs, labels, task),
                          uncounted_pad_predictions(inputs, labels, getattr(task, "shift", 0)))
        check_replaced_mask(self, model, prepared, inputs, labels, task)  # a model that builds its own mask
        return inputs, labels

    def _call(self, model: Any, params: dict, inputs: Any, *, causal: bool, masks: bool = True) -> Any:
        """``forward`` with ``params``: ``model(inputs)``, or ``model(**inputs)`` for a dict batch (its 2-D
        ``attention_mask`` made 4-D as ``attention_mask`` says; as it is with ``masks=False``). A
        ``torch.compile``'d model runs its eager module (``_orig_mod``; the keys' prefix taken off): the closed form's
        hooks see its layers, as ``vmap`` and the loop see its operations."""
        import torch
        from torch.func import functional_call

        if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model, params = model._orig_mod, {key.removeprefix("_orig_mod."): value for key, value in params.items()}
        if not isinstance(inputs, Mapping):
            return functional_call(model, params, (inputs,))
        kwargs = dict(inputs)
        if masks and self.attention_mask != "pass" and not (self.attention_mask == "auto" and reads_own_mask(model)):
            kwargs = model_masks(kwargs, prepared_dtype(params), causal=causal,
                                 encoder_decoder=is_encoder_decoder(model), model=model)
        return functional_call(model, params, (), kwargs)

    def _logits(self, model: Any, prepared: TorchCheckpoint, inputs: Any, task: Any, *, causal: bool) -> Any:
        from .interaction import check_interaction, one_by_one

        n = _rows(inputs)

        def call(rows: Any) -> Any:
            return self._call(model, {**prepared.params, **prepared.frozen}, rows, causal=causal)

        try:
            output = call(inputs)  # the batch first: its errors name its shapes
            check_interaction(lambda rows: output_logits(call(rows), self.logits_fn), prepared, inputs, n)
            if prepared.__dict__.get("_interacting"):  # examples that see each other: each one's output alone
                output = one_by_one(call, inputs, n)
        except Exception as exc:
            if isinstance(exc, RuntimeError):
                raise_dtype_error(exc, prepared, inputs)
            note_mask(exc, inputs, self.attention_mask, model, lambda: self._call(  # the mask as it is: the same
                model, {**prepared.params, **prepared.frozen}, inputs, causal=causal, masks=False))  # error, no note
            raise
        ndim = task.logits_ndim
        logits = batch_logits(output_logits(output, self.logits_fn), n, ndim)
        if logits.shape[0] != n or (ndim is not None and logits.ndim != ndim):
            expected = {2: "(batch, n_outputs)", 3: "(batch, sequence, vocabulary)"}.get(ndim, f"{ndim}-D")
            per_token = ("; per-token class scores (tagging, NER) take task='token_classification'"
                         if ndim == 2 and logits.ndim == 3 and logits.shape[0] == n else "")
            raise TrakValueError(f"task {task.name!r} needs the model's output with shape {expected}, got "
                                 f"{tuple(logits.shape)} for {n} examples; make forward() return one row per "
                                 f"example (or pass logits_fn=){per_token}")
        return logits

    def gradients(self, model: Any, prepared: TorchCheckpoint, inputs: Any, labels: Any,
                  task: Any) -> tuple[Any, Any]:
        """See ``Backend.gradients``: in closed form, with ``vmap(grad)`` or in a loop (``per_example``); one thread
        at a time per model (``trak_torch.locks``)."""
        with model_lock(model):
            return self._gradients(model, prepared, inputs, labels, task)

    def _gradients(self, model: Any, prepared: TorchCheckpoint, inputs: Any, labels: Any,
                   task: Any) -> tuple[Any, Any]:
        import array_api_compat.torch as xp
        import torch

        check_context(prepared.device)
        causal = self._causal(model)
        inputs, labels = self._batch(model, prepared, inputs, labels, task, causal)
        uses = self._closed_form_uses(model, prepared, inputs, labels, task, causal)
        if uses is not None:
            from .closed_form import NotPerExample, closed_form_gradients

            try:
                with eval_mode(model), attention_for_closed_form(model):  # SDPA, not vmap's eager attention
                    grads, logits = closed_form_gradients(self, model, prepared, uses, inputs, labels, task, causal)
                    return grads, task.out_to_loss(logits, labels, xp=xp)
            except RuntimeError as exc:  # NotPerExample too: a batch unlike the checked one (a layer call's shape,
                from .closed_form_check import log_fallback  # or a position table's copies the model resamples for

                if not isinstance(exc, NotPerExample):  # another image size): vmap from now on, which raises the
                    raise_dtype_error(exc, prepared, inputs)  # model's own errors again; another dtype is named
                log_fallback(exc)
                prepared.__dict__["_closed_form"][id(task)] = None
        if self.per_example != "loop" and "_looped" not in prepared.__dict__:
            try:
                return vmap_in_attention(self, model, prepared, inputs, labels, task, causal)
            except (RuntimeError, NotImplementedError) as exc:  # a kernel vmap cannot batch, or a real error:
                refuse_to_loop(exc, self.chunk_size)               # the model's own (plain autograd raises it
                error = exc                                        # again below) or one a loop would hide
        else:
            error = None
        with eval_mode(model), attention_for_vmap(model, prepared.dtype), torch.no_grad():
            logits = self._logits(model, prepared, inputs, task, causal=causal)
        check_labels(task, labels, logits)
        with eval_mode(model), attention_for_vmap(model, prepared.dtype):
            grads = looped_gradients(self, model, prepared, inputs, labels, task, causal)  # raises a real error
        if error is not None:
            vmap_cannot_batch(prepared, error)
        return grads, task.out_to_loss(logits, labels, xp=xp)

    def _closed_form_uses(self, model: Any, prepared: TorchCheckpoint, inputs: Any, labels: Any, task: Any,
                          causal: bool) -> list | None:
        """The layers of the closed-form path (``per_example="auto"``), found and checked once per checkpoint
        (on the first two examples of its first batch, against plain autograd one example at a time)."""
        if self.per_example != "auto":
            return None
        cache = prepared.__dict__.setdefault("_closed_form", {})
        key = id(task)
        if key not in cache and _rows(inputs) < 2:  # one example shows no interaction between examples: vmap
            return None                             # for it, and the check waits for a batch of two or more
        if key not in cache:
            import torch
            from torch.utils._pytree import tree_map

            from .closed_form_check import checked_uses

            with eval_mode(model), attention_for_vmap(model, prepared.dtype), torch.no_grad():  # the dense checks
                try:                                                        # first, on two rows (eager attention's
                    self._logits(model, prepared, tree_map(lambda t: t[:2], inputs), task, causal=causal)  # scores
                except Exception:                                           # of a long batch are n H T^2 numbers):
                    self._logits(model, prepared, inputs, task, causal=causal)  # their error, raised by the batch,
                    raise                                                   # names its shapes
            with eval_mode(model), attention_for_closed_form(model):  # as closed_form_gradients runs it
                uses = checked_uses(self, model, prepared, inputs, labels, task, causal)
            cache[key] = uses
        return cache[key]

    def example_output(self, model: Any, prepared: TorchCheckpoint, params: dict, one: Any, label: Any, task: Any,
                       causal: bool) -> Any:
        """The task output (a scalar) of one example: ``one`` is a batch of one row, ``label`` its labels.

        Parameters
        ----------
        model : torch.nn.Module
            The model, called with ``torch.func.functional_call``.
        prepared : TorchCheckpoint
            The checkpoint: its ``frozen`` parameters and buffers enter as constants.
        params : dict of str to torch.Tensor
            The attributed parameters to call the model with (those differentiated).
        one : torch.Tensor or mapping of str to torch.Tensor
            A batch of one example (every array of a dict batch with one row).
        label : torch.Tensor
            Its labels, one row.
        task : Task
            The task whose ``output`` is taken.
        causal : bool
            Whether a dict batch's 2-D ``attention_mask`` becomes a causal mask (``attention_mask``).

        Returns
        -------
        torch.Tensor
            0-d: ``task.output`` of the example.
        """
        import array_api_compat.torch as xp

        out = output_logits(self._call(model, {**params, **prepared.frozen}, one, causal=causal), self.logits_fn)
        out = out.reshape(1, -1) if task.logits_ndim == 2 else out
        return task.output(out, label, xp=xp)[0]

    def _factorized(self, model: Any, prepared: TorchCheckpoint, inputs: Any, causal: bool, *, k: int, seed: int,
                    checkpoint: int, options: Any) -> Any:
        from .kronecker_plan import factorized_state

        with eval_mode(model), attention_for_vmap(model, prepared.dtype):
            return factorized_state(self, model, prepared, inputs, causal, k=k, seed=seed, checkpoint=checkpoint,
                                    options=options)

    def factorized_plan(self, model: Any, prepared: TorchCheckpoint, inputs: Any, labels: Any, task: Any, *,
                        k: int, options: Any) -> Any:
        """The ``trak_core.kronecker.KroneckerPlan`` of ``model`` (found once per checkpoint; no factors)."""
        from .kronecker_plan import discovered

        with model_lock(model):
            causal = self._causal(model)
            inputs, labels = self._batch(model, prepared, inputs, labels, task, causal)
            with eval_mode(model), attention_for_vmap(model, prepared.dtype):
                return discovered(self, model, prepared, inputs, causal, options, k)[0]

    def factorized_features(self, model: Any, prepared: TorchCheckpoint, inputs: Any, labels: Any, task: Any, *,
                            k: int, seed: int, checkpoint: int, options: Any) -> tuple[Any, Any]:
        """``proj_type="kronecker"`` features ``(n, k)`` and out-to-loss weights (``trak_torch.kronecker``); one thread
        at a time per model (``trak_torch.locks``)."""
        with model_lock(model):
            return self._factorized_features(model, prepared, inputs, labels, task, k=k, seed=seed,
                                             checkpoint=checkpoint, options=options)

    def _factorized_features(self, model: Any, prepared: TorchCheckpoint, inputs: Any, labels: Any, task: Any, *,
                             k: int, seed: int, checkpoint: int, options: Any) -> tuple[Any, Any]:
        import array_api_compat.torch as xp
        import torch

        from .kronecker import batch_features
        from .kronecker_check import check_once

        causal = self._causal(model)
        inputs, labels = self._batch(model, prepared, inputs, labels, task, causal)
        state = self._factorized(model, prepared, inputs, causal, k=k, seed=seed, checkpoint=checkpoint,
                                 options=options)
        with eval_mode(model):
            with attention_for_vmap(model, prepared.dtype), torch.no_grad():
                logits = self._logits(model, prepared, inputs, task, causal=causal)
            check_labels(task, labels, logits)
            out_to_loss = task.out_to_loss(logits, labels, xp=xp)
            def run() -> Any:
                return batch_features(self, model, prepared, state, inputs, labels, task, causal, seed=seed,
                                      checkpoint=checkpoint, chunk=self.chunk_size,
                                      attention=(lambda: attention_for_vmap(model, prepared.dtype),
                                                 lambda: attention_for_closed_form(model)))

            features = run()
            if not state.checked:  # once per checkpoint: the first example against its dense gradient
                features = check_once(self, model, prepared, state, inputs, labels, task, causal, features, run)
        return features, out_to_loss

    def _causal(self, model: Any) -> bool:
        """Whether a dict batch's 2-D ``attention_mask`` becomes a causal mask (see ``attention_mask``)."""
        if self.attention_mask in ("causal", "bidirectional"):
            return self.attention_mask == "causal"
        return causal_model(model)  # a Hugging Face causal LM, or a wrapper holding one

    def project(self, grads: Any, k: int, *, seed: int, checkpoint: int, kind: str,
                precision: str = "float32") -> Any:
        """``trak_core.project``: on CUDA, float16 tensor-core products of a split input (``precision``)."""
        from trak_core.projection import project

        return project(grads, k, seed=seed, checkpoint=checkpoint, kind=kind, precision=precision)

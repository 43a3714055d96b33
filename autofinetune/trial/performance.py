"""The performance switches of a trial: dtype policy (mixed precision) and XLA compilation.

Keras keeps the dtype policy in its global state, which every trial of a process shares and
which ``keras.utils.clear_session()`` resets. :func:`keras_session` therefore starts a trial
with a fresh session and the spec's policy, and gives the caller's policy back when the trial
ends, also when it raises. Keras holds that state per thread, so trials running in threads
side by side do not see each other's policy.

Only the ``keras`` API is used here, so every backend runs it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

#: Keras dtype policy of each ``performance.mixed_precision`` value.
POLICIES: dict[str, str] = {
    "off": "float32",
    "mixed_float16": "mixed_float16",
    "mixed_bfloat16": "mixed_bfloat16",
}


def policy_name(mixed_precision: str) -> str:
    """The Keras dtype policy of a ``performance.mixed_precision`` value.

    Args:
        mixed_precision: ``"off"``, ``"mixed_float16"`` or ``"mixed_bfloat16"``.

    Raises:
        ValueError: any other value; the message lists the allowed ones.
    """
    try:
        return POLICIES[mixed_precision]
    except KeyError:
        raise ValueError(
            f"performance.mixed_precision: got {mixed_precision!r}; allowed: {', '.join(POLICIES)}"
        ) from None


@contextmanager
def dtype_policy_scope(mixed_precision: str) -> Iterator[str]:
    """Set Keras's global dtype policy for a block, and restore the previous one after it.

    Layers take the policy when they are created, so the model must be built inside the
    block; a model built under ``mixed_float16`` gets its optimizer wrapped in a
    ``LossScaleOptimizer`` by ``model.compile`` (``auto_scale_loss=True``).

    Args:
        mixed_precision: ``"off"`` (float32), ``"mixed_float16"`` or ``"mixed_bfloat16"``.

    Yields:
        The name of the policy in force.
    """
    import keras

    name = policy_name(mixed_precision)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield name
    finally:
        keras.config.set_dtype_policy(previous)


@contextmanager
def keras_session(performance) -> Iterator[str]:
    """A fresh Keras session with the trial's dtype policy; the caller's policy comes back after.

    ``clear_session()`` resets the dtype policy together with the rest of Keras's global
    state, so the caller's policy is read before it and the trial's is set after it.

    Args:
        performance: The spec's :class:`~autofinetune.spec.PerformanceSpec`.

    Yields:
        The name of the trial's dtype policy.
    """
    import keras

    previous = keras.config.dtype_policy()
    # No forced garbage collection: with the backbone and compiled parts kept per process it
    # walked every kept object, ~0.35 s of a 0.5 s pruned trial, and freed no more than
    # Python's own collector does (resident memory after 24 trials: 1.93 vs 2.00 GiB).
    keras.utils.clear_session(free_memory=False)
    try:
        with dtype_policy_scope(performance.mixed_precision) as name:
            yield name
    finally:
        keras.config.set_dtype_policy(previous)


def compile_options(performance) -> dict[str, Any]:
    """Keyword arguments for ``model.compile`` that the performance switches decide.

    Args:
        performance: The spec's :class:`~autofinetune.spec.PerformanceSpec`.
    """
    # auto_scale_loss is Keras's default; spelled out because mixed_float16 depends on it:
    # without loss scaling, small float16 gradients underflow to zero.
    return {"jit_compile": performance.jit_compile, "auto_scale_loss": True}


def describe_compiled(model, *, input_pipeline: str) -> dict[str, Any]:
    """What a compiled model really runs with (Keras may resolve or refuse a switch).

    Args:
        model: A compiled ``keras.Model``.
        input_pipeline: The input pipeline that feeds it (after ``"auto"`` was resolved).
    """
    import keras

    return {
        "dtype_policy": model.dtype_policy.name,
        # "auto" resolves at compile time, and Keras turns XLA off for layers that lack it.
        "jit_compile": bool(model.jit_compile),
        "loss_scaling": isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer),
        "input_pipeline": input_pipeline,
    }

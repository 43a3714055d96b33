"""Compiled models a worker process keeps from one trial to the next, so their steps are traced once.

A trial on cached features trains small models -- the head alone (phase 1), or the top blocks
and the head (phase 2) -- and Keras traces each new model's train and test steps in its first
epoch: about as long as a few cached epochs, in every trial, also in the many that are pruned
after one. Trials of a search differ mostly in numbers (learning rate, momentum), rarely in
shapes (head units, unfreeze depth), so a process keeps, next to its backbone
(:meth:`autofinetune.trial.session.TrialSession.backbone`):

* one classifier per head shape; a later trial with that shape gets it back with every head
  variable (weights and the dropout seed) set to what a fresh, seeded build of its own gives;
* the compiled trainable parts of each such classifier, per unfreeze depth and compile
  settings; a later trial gets one back with its optimizer as new (every slot as built, the
  step count at zero) and its own learning rate and momentum.

Both live in variables the traced steps read, not in constants traced into them: Keras keeps
the learning rate in a variable, and :class:`RetunableRMSprop` / :class:`RetunableSGD` /
:class:`RetunableAdam` keep the momentum (Adam's ``beta_1``) and the weight decay in one each. A trial on kept models therefore trains exactly as on new ones.

Parts that train residual blocks hold optimizer slots as large as those blocks, so only the
latest :data:`MAX_BLOCK_PARTS` of them are kept.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import keras
import numpy as np
from keras import ops

#: Compiled parts that train residual blocks kept per process; the latest are kept.
MAX_BLOCK_PARTS = 3


class _RetunableWeightDecay:
    """Keras's decoupled weight decay (``w -= w * weight_decay * learning_rate`` before each
    update), the factor read from a variable: with 0 every weight is left as it was."""

    def _apply_weight_decay(self, variables):
        for variable in variables:
            if self._use_weight_decay(variable):
                lr = ops.cast(self.learning_rate, variable.dtype)
                decay = ops.cast(self.weight_decay_variable, variable.dtype)
                self.assign_sub(variable, ops.multiply(ops.multiply(variable, decay), lr))


class RetunableSGD(_RetunableWeightDecay, keras.optimizers.SGD):
    """SGD whose momentum can change between fits without retracing the train step.

    Keras's SGD tests ``momentum != 0`` in Python and multiplies by the float, so the value is
    traced into the step. Here the momentum slots always exist and the factor is a variable;
    with momentum 0 the update is the same as plain SGD's (``0 * m - lr * g`` is ``-lr * g``).
    """

    def build(self, variables):
        if self.built:
            return
        keras.optimizers.Optimizer.build(self, variables)  # the base optimizer's, not SGD's
        self.momentums = self.add_optimizer_variables(variables, "momentum")
        self.momentum_variable = _scalar_variable(self, "momentum_value", self.momentum)
        self.weight_decay_variable = _scalar_variable(self, "weight_decay_value", self.weight_decay or 0.0)

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        m = self.momentums[self._get_variable_index(variable)]
        momentum = ops.cast(self.momentum_variable, variable.dtype)
        self.assign(m, ops.subtract(ops.multiply(m, momentum), ops.multiply(gradient, learning_rate)))
        if self.nesterov:
            self.assign_add(variable, ops.subtract(ops.multiply(m, momentum), ops.multiply(gradient, learning_rate)))
        else:
            self.assign_add(variable, m)


class RetunableRMSprop(_RetunableWeightDecay, keras.optimizers.RMSprop):
    """RMSprop whose momentum can change between fits without retracing the train step.

    As :class:`RetunableSGD`: the momentum slots always exist and the factor is a variable;
    with momentum 0 the update is the same as plain RMSprop's.
    """

    def build(self, var_list):
        if self.built:
            return
        keras.optimizers.Optimizer.build(self, var_list)  # the base optimizer's, not RMSprop's
        self._velocities = self.add_optimizer_variables(var_list, "velocity")
        self._momentums = self.add_optimizer_variables(var_list, "momentum")
        self._average_gradients = []
        if self.centered:
            self._average_gradients = self.add_optimizer_variables(var_list, "average_gradient")
        self.momentum_variable = _scalar_variable(self, "momentum_value", self.momentum)
        self.weight_decay_variable = _scalar_variable(self, "weight_decay_value", self.weight_decay or 0.0)

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        index = self._get_variable_index(variable)
        velocity = self._velocities[index]
        rho = self.rho
        self.assign(velocity, ops.add(ops.multiply(rho, velocity), ops.multiply(1 - rho, ops.square(gradient))))
        if self.centered:
            average_grad = self._average_gradients[index]
            self.assign(average_grad, ops.add(ops.multiply(rho, average_grad), ops.multiply(1 - rho, gradient)))
            denominator = velocity - ops.square(average_grad) + self.epsilon
        else:
            denominator = ops.add(velocity, self.epsilon)
        increment = ops.divide(ops.multiply(lr, gradient), ops.sqrt(denominator))
        momentum = self._momentums[index]
        factor = ops.cast(self.momentum_variable, variable.dtype)
        self.assign(momentum, ops.add(ops.multiply(factor, momentum), increment))
        self.assign_sub(variable, momentum)


class RetunableAdam(_RetunableWeightDecay, keras.optimizers.Adam):
    """Adam whose ``beta_1`` (its momentum) can change between fits without retracing the train step.

    Keras's Adam multiplies by the float ``beta_1``, so the value is traced into the step; here
    it is read from a variable, and the update is otherwise Keras's (no AMSGrad).
    """

    #: The attribute that holds the momentum the variable stands for (see :func:`retune`).
    momentum_attribute = "beta_1"

    def build(self, var_list):
        if self.built:
            return
        keras.optimizers.Optimizer.build(self, var_list)  # the base optimizer's, not Adam's
        self._momentums, self._velocities = self.add_optimizer_variables(var_list, ["momentum", "velocity"])
        self.momentum_variable = _scalar_variable(self, "beta_1_value", self.beta_1)
        self.weight_decay_variable = _scalar_variable(self, "weight_decay_value", self.weight_decay or 0.0)

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        local_step = ops.cast(self.iterations + 1, variable.dtype)
        beta_1 = ops.cast(self.momentum_variable, variable.dtype)
        beta_1_power = ops.power(beta_1, local_step)
        beta_2_power = ops.power(ops.cast(self.beta_2, variable.dtype), local_step)
        index = self._get_variable_index(variable)
        m, v = self._momentums[index], self._velocities[index]
        alpha = lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        self.assign_add(m, ops.multiply(ops.subtract(gradient, m), 1 - beta_1))
        self.assign_add(v, ops.multiply(ops.subtract(ops.square(gradient), v), 1 - self.beta_2))
        self.assign_sub(variable, ops.divide(ops.multiply(m, alpha), ops.add(ops.sqrt(v), self.epsilon)))


def _scalar_variable(optimizer, name: str, value: float):
    return optimizer.add_variable((), initializer=keras.initializers.Constant(float(value)), name=name)


def retune(optimizer, *, learning_rate: float, momentum: float, weight_decay: float) -> None:
    """Set a built retunable optimizer's learning rate, momentum (Adam's ``beta_1``) and weight
    decay (a loss-scale wrapper's too).

    Retunable optimizers come from :func:`autofinetune.trial.model.make_optimizer`.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    inner.learning_rate = learning_rate
    setattr(inner, getattr(inner, "momentum_attribute", "momentum"), float(momentum))
    inner.momentum_variable.assign(float(momentum))
    inner.weight_decay = float(weight_decay)
    inner.weight_decay_variable.assign(float(weight_decay))


@dataclass
class _KeptPart:
    """A compiled trainable part and its optimizer's variables as built (slots zero, step 0)."""

    model: Any
    optimizer_as_built: list[np.ndarray]


@dataclass
class KeptModels:
    """The classifiers and compiled parts one kept backbone carries from trial to trial.

    Only the trial that holds the backbone uses them (the session lends it to one
    trial at a time), so they need no lock.
    """

    #: Head signature -> the classifier with that head, on the kept backbone.
    classifiers: dict[str, Any] = field(default_factory=dict)
    #: (head signature, part key) -> compiled part; oldest first.
    parts: OrderedDict[tuple, _KeptPart] = field(default_factory=OrderedDict)

    def classifier_like(self, fresh) -> Any:
        """The kept classifier with ``fresh``'s head, set to ``fresh``'s head variables.

        The first classifier of a head shape is kept and returned as it is.

        Args:
            fresh: A classifier just built (and seeded) on the kept backbone.
        """
        signature = head_signature(fresh)
        kept = self.classifiers.get(signature)
        if kept is None:
            self.classifiers[signature] = fresh
            return fresh
        for kept_layer, fresh_layer in zip(_head_layers(kept), _head_layers(fresh)):
            for kept_variable, fresh_variable in zip(kept_layer.variables, fresh_layer.variables):
                kept_variable.assign(fresh_variable)  # weights, and a dropout layer's seed state
        return kept

    def compiled_part(
        self,
        classifier,
        key: tuple,
        build: Callable[[], Any],
        *,
        learning_rate: float,
        momentum: float,
        weight_decay: float,
    ) -> tuple[Any, bool]:
        """A compiled trainable part of a kept classifier, kept for the next trial.

        Args:
            classifier: A classifier from :meth:`classifier_like`.
            key: What else the compiled part depends on (depth, optimizer, loss, compile options).
            build: Builds and compiles the part with a retunable optimizer; called on a miss.
            learning_rate, momentum, weight_decay: The phase's; set on the optimizer of a kept part.

        Returns:
            The part, and whether it was kept from an earlier trial (its steps already traced).
        """
        full_key = (head_signature(classifier), *key)
        kept = self.parts.get(full_key)
        if kept is not None:
            self.parts.move_to_end(full_key)
            for variable, value in zip(kept.model.optimizer.variables, kept.optimizer_as_built):
                variable.assign(value)
            retune(kept.model.optimizer, learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay)
            return kept.model, True
        model = build()
        # Built now, not in the first fit, so the optimizer's initial state can be recorded.
        model.optimizer.build(model.trainable_variables)
        self.parts[full_key] = _KeptPart(model, [np.array(v) for v in model.optimizer.variables])
        if _trains_blocks(model):  # its optimizer slots are as large as its blocks
            self._evict_block_parts(keep=full_key)
        return model, False

    def forget(self, model) -> None:
        """Drop a part whose fit failed (its state after an exception is not trusted)."""
        for key, kept in list(self.parts.items()):
            if kept.model is model:
                del self.parts[key]

    def _evict_block_parts(self, *, keep: tuple) -> None:
        block_keys = [key for key, kept in self.parts.items() if _trains_blocks(kept.model)]
        for key in block_keys[: max(0, len(block_keys) - MAX_BLOCK_PARTS)]:
            if key != keep:
                del self.parts[key]


def _trains_blocks(model) -> bool:
    return any(isinstance(layer, keras.Model) for layer in model.layers)


def _head_layers(classifier) -> list:
    """Every layer of a classifier but its backbone (the only sub-model)."""
    return [layer for layer in classifier.layers if not isinstance(layer, keras.Model)]


def head_signature(classifier) -> str:
    """What two classifiers on one backbone must share to be interchangeable: every layer's
    config outside the backbone (input size, head units, dropout rate, dtype policy...)."""
    configs = [{"class": type(layer).__name__, **layer.get_config()} for layer in _head_layers(classifier)]
    return json.dumps(configs, sort_keys=True, default=str)

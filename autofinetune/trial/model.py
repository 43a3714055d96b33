"""The classifier: raw pixels -> (augmentation) -> the backbone's preprocessing -> backbone -> head.

Only the ``keras`` API is used here, so every Keras 3 backend (TensorFlow, JAX, PyTorch) runs it.
"""

from __future__ import annotations

from typing import Any, Sequence

import keras
import numpy as np
from keras import layers, ops

from autofinetune.spec.objectives import TOP_K
from autofinetune.trial.backbones import block_map, blocks_in_order

#: Per-channel means subtracted by ResNet50's "caffe" preprocessing, in BGR order.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


#: Name of the preprocessing layer; the feature cache and exports find it by this name.
PREPROCESS_LAYER = "preprocess"


def caffe_preprocessing(*, name: str = PREPROCESS_LAYER) -> layers.Conv2D:
    """``keras.applications.resnet50.preprocess_input`` (caffe mode) as a built-in Keras layer.

    RGB -> BGR and subtraction of the ImageNet channel means are one affine map per pixel, so
    a fixed, non-trainable 1x1 convolution computes them exactly: its kernel is the channel
    permutation (each output channel takes one input channel with weight 1) and its bias the
    negated means. The inputs stay on the 0..255 scale (no 1/255 rescaling). Being a built-in
    layer, a saved model loads with plain Keras (``safe_mode=True``, no custom objects), where
    autofinetune is not installed.
    """
    permutation = np.zeros((1, 1, 3, 3), dtype="float32")
    for out_channel in range(3):
        permutation[0, 0, 2 - out_channel, out_channel] = 1.0  # BGR channel c is RGB channel 2 - c
    return layers.Conv2D(
        3, 1, name=name, trainable=False,
        kernel_initializer=keras.initializers.Constant(permutation),
        bias_initializer=keras.initializers.Constant(-np.asarray(CAFFE_BGR_MEAN, dtype="float32")),
    )


def preprocessing_layer(kind: str = "caffe", *, name: str = PREPROCESS_LAYER) -> layers.Layer:
    """The classifier's preprocessing of raw 0..255 RGB pixels, as a built-in Keras layer.

    Args:
        kind: The backbone's (its catalogue entry's ``preprocessing``): ``caffe``
            (:func:`caffe_preprocessing`), ``tf`` (scaled to [-1, 1], as
            ``keras.applications.resnet_v2.preprocess_input``) or ``none`` (the backbone
            preprocesses inside; the layer passes pixels through, so the feature cache and the
            exports find the layer by name whatever the backbone).

    Raises:
        ValueError: ``kind`` is none of those.
    """
    if kind == "caffe":
        return caffe_preprocessing(name=name)
    if kind == "tf":
        return layers.Rescaling(1.0 / 127.5, offset=-1.0, name=name)
    if kind == "none":
        return layers.Identity(name=name)
    raise ValueError(f"preprocessing must be 'caffe', 'tf' or 'none', but got {kind!r}")


@keras.saving.register_keras_serializable(package="autofinetune")
class ResNetPreprocess(layers.Layer):
    """The former custom preprocessing layer, kept registered so older checkpoints still load.

    New models use :func:`caffe_preprocessing` instead, which computes the same.
    """

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        x = ops.flip(x, axis=-1)
        return x - ops.convert_to_tensor(CAFFE_BGR_MEAN, dtype=self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


def augmentation_layers(augmentation) -> list[layers.Layer]:
    """Random augmentation layers of an :class:`~autofinetune.spec.AugmentationSpec`.

    They act in training only; at inference they pass images through unchanged.
    """
    result: list[layers.Layer] = []
    if augmentation is None or not augmentation.enabled:
        return result
    if augmentation.flip != "none":
        result.append(layers.RandomFlip(augmentation.flip, name="augment_flip"))
    if augmentation.rotation > 0:
        result.append(layers.RandomRotation(augmentation.rotation, name="augment_rotation"))
    if augmentation.zoom > 0:
        result.append(layers.RandomZoom(augmentation.zoom, name="augment_zoom"))
    if augmentation.contrast > 0:
        result.append(layers.RandomContrast(augmentation.contrast, name="augment_contrast"))
    return result


#: The head's last Dense layer: one score (logit) per class, before the softmax.
LOGITS_LAYER = "logits"
#: The classifier's output layer: the softmax of the logits, what a saved model outputs.
OUTPUT_LAYER = "predictions"


def build_head(features, *, head_units: int, num_classes: int, dropout: float = 0.0):
    """GlobalAveragePooling2D -> Dense(head_units, relu) -> [Dropout] -> Dense (logits) -> Softmax.

    The logits and the softmax compute in float32 so mixed precision keeps a stable output.
    """
    x = layers.GlobalAveragePooling2D(name="avg_pool")(features)
    x = layers.Dense(head_units, activation="relu", name="head_dense")(x)
    if dropout > 0:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    logits = layers.Dense(num_classes, dtype="float32", name=LOGITS_LAYER)(x)
    return layers.Softmax(dtype="float32", name=OUTPUT_LAYER)(logits)


def build_classifier(
    backbone: keras.Model,
    *,
    num_classes: int,
    head_units: int,
    dropout: float = 0.0,
    augmentation=None,
    preprocessing: str = "caffe",
) -> keras.Model:
    """Wrap a backbone into a classifier of raw 0..255 RGB images.

    The backbone is called with ``training=False``: its BatchNormalization layers always run in
    inference mode, also after they are unfrozen.

    Args:
        backbone: A headless backbone from :func:`autofinetune.trial.backbones.build_backbone`.
        num_classes: Number of output classes.
        head_units: Units of the Dense layer of the head.
        dropout: Dropout rate before the softmax layer; 0 leaves it out.
        augmentation: An ``AugmentationSpec``, or ``None`` for no augmentation.
        preprocessing: The backbone's, see :func:`preprocessing_layer`.
    """
    size = backbone.input_shape[1]
    inputs = keras.Input(shape=(size, size, 3), name="image")
    x = inputs
    for layer in augmentation_layers(augmentation):
        x = layer(x)
    x = preprocessing_layer(preprocessing)(x)
    features = backbone(x, training=False)
    outputs = build_head(features, head_units=head_units, num_classes=num_classes, dropout=dropout)
    return keras.Model(inputs, outputs, name="autofinetune_classifier")


def freeze_backbone(backbone: keras.Model) -> None:
    """Freeze every layer of the backbone (phase 1)."""
    backbone.trainable = False


def unfreeze_top_blocks(backbone: keras.Model, depth: int) -> list[str]:
    """Make exactly the top ``depth`` blocks trainable; everything else stays frozen.

    BatchNormalization layers stay frozen in every block: their statistics and scale were
    learned on the pretraining data, and fine-tuning them on a small dataset destroys them.

    Args:
        backbone: The backbone inside the classifier.
        depth: How many residual blocks to unfreeze, counted from the top (output side).

    Returns:
        The unfrozen block names, from the top down (``["conv5_block3", "conv5_block2", ...]``).

    Raises:
        ValueError: ``depth`` is negative or larger than the number of blocks.
    """
    block_of, blocks = _blocks_for_depth(backbone, depth)
    top = blocks[len(blocks) - depth :][::-1]
    if depth == 0:
        backbone.trainable = False
        return []
    chosen = set(top)
    # Setting the container trainable flips every sub-layer; then each layer gets its own flag.
    backbone.trainable = True
    for layer in backbone.layers:
        layer.trainable = block_of[layer.name] in chosen and not isinstance(layer, layers.BatchNormalization)
    return top


def _blocks_for_depth(backbone: keras.Model, depth: int) -> tuple[dict[str, str | None], list[str]]:
    """The backbone's layer -> block map and its blocks from the bottom, with ``depth`` checked.

    Raises:
        ValueError: ``depth`` is negative or larger than the number of blocks.
    """
    block_of = block_map(backbone)
    blocks = blocks_in_order(block_of)
    if not 0 <= depth <= len(blocks):
        raise ValueError(f"unfreeze_depth must be in [0, {len(blocks)}], but got {depth}")
    return block_of, blocks


def count_trainable_params(model: keras.Model) -> int:
    """Number of scalars in the model's trainable weights."""
    return int(sum(int(_size(w.shape)) for w in model.trainable_weights))


def _size(shape: Sequence[int]) -> int:
    total = 1
    for dim in shape:
        total *= int(dim)
    return total


def make_optimizer(
    name: str, *, learning_rate: float, momentum: float, weight_decay: float = 0.0, retunable: bool = False
) -> keras.optimizers.Optimizer:
    """``rmsprop`` (the seed's phase-1 choice), ``sgd`` or ``adam``, with learning rate and momentum.

    Args:
        momentum: The momentum of RMSprop and SGD; Adam's ``beta_1`` (its other settings are
            Keras's defaults).
        weight_decay: Keras's decoupled weight decay: each step first multiplies every trained
            weight by ``1 - learning_rate * weight_decay``; 0 leaves it out.
        retunable: Keras's own optimizer (``False``: what a saved model names), or its
            :mod:`autofinetune.trial.reuse` twin whose momentum and weight decay can change
            without retracing.
    """
    from autofinetune.trial.reuse import RetunableAdam, RetunableRMSprop, RetunableSGD

    classes: dict[str, type[keras.optimizers.Optimizer]] = {
        "rmsprop": RetunableRMSprop if retunable else keras.optimizers.RMSprop,
        "sgd": RetunableSGD if retunable else keras.optimizers.SGD,
        "adam": RetunableAdam if retunable else keras.optimizers.Adam,
    }
    if name not in classes:
        raise ValueError(f"optimizer must be one of {sorted(classes)}, but got {name!r}")
    # A retunable optimizer always decays (by a variable, 0 by default) so a later trial can set it.
    decay = float(weight_decay) if retunable or weight_decay > 0 else None
    momentum_keyword = "beta_1" if name == "adam" else "momentum"
    return classes[name](learning_rate=learning_rate, weight_decay=decay, **{momentum_keyword: momentum})


def training_view(model: keras.Model) -> keras.Model:
    """``model`` (a classifier or a trainable part) without its final softmax: logits out.

    It shares every layer with ``model``, so fitting it trains ``model`` in place.

    Raises:
        ValueError: ``model``'s output is not computed by a softmax layer.
    """
    output = model.outputs[0]
    softmax, node_index, _ = output._keras_history
    if not isinstance(softmax, layers.Softmax):
        raise ValueError(
            f"model {model.name!r}: its output comes from {type(softmax).__name__} {softmax.name!r}, "
            "not from the softmax layer that build_classifier ends with"
        )
    logits = softmax._inbound_nodes[node_index].input_tensors[0]
    return keras.Model(model.inputs, logits, name=f"{model.name}_logits")


def trial_metrics() -> list[keras.metrics.Metric]:
    """The metrics every trial logs besides its loss (:data:`~autofinetune.spec.objectives.EPOCH_METRICS`).

    Each takes one-hot labels and class scores, probabilities or logits alike (the training
    view's): accuracy and top-k compare ranks, F1 counts each image's highest score as its class.
    """
    return [
        keras.metrics.CategoricalAccuracy(name="accuracy"),
        keras.metrics.TopKCategoricalAccuracy(k=TOP_K, name=f"top_{TOP_K}_accuracy"),
        # Macro: every class counts alike; threshold None takes each image's highest score.
        keras.metrics.F1Score(average="macro", threshold=None, name="f1"),
    ]


def compile_for_training(model: keras.Model, optimizer, *, label_smoothing: float = 0.0, **compile_kwargs: Any) -> keras.Model:
    """Compile ``model``'s :func:`training_view` for ``fit``, and return that view.

    The loss is categorical cross-entropy computed from the logits (one-hot labels), the metrics
    :func:`trial_metrics`. From probabilities, Keras's JAX and PyTorch backends clip them to
    [1e-7, 1 - 1e-7], so a head whose softmax saturates (a randomly initialised or badly scaled
    backbone, a high learning rate) gets no gradient and never learns again; TensorFlow's
    backend finds the logits behind the softmax itself. From logits every backend trains alike.

    Args:
        model: A classifier from :func:`build_classifier` or a part of it from
            :func:`build_trainable_part`.
        optimizer: A Keras optimizer (:func:`make_optimizer`).
        label_smoothing: Passed to the loss.
        compile_kwargs: More ``compile`` arguments (:func:`~autofinetune.trial.performance.compile_options`).
    """
    view = training_view(model)
    view.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=label_smoothing),
        metrics=trial_metrics(),
        **compile_kwargs,
    )
    return view


def compile_classifier(model: keras.Model, optimizer, *, label_smoothing: float = 0.0) -> None:
    """Compile the classifier itself (probabilities out), so that ``evaluate`` works on it (the
    keras-tuner engine hands this model to its users); training goes through
    :func:`compile_for_training`."""
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=trial_metrics(),
    )


def find_backbone(model: keras.Model) -> keras.Model:
    """The backbone sub-model of a classifier built by :func:`build_classifier`."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            return layer
    raise ValueError(f"model {model.name!r} has no backbone sub-model")


# --- frozen prefix / trainable part --------------------------------------------------------
#
# The feature cache cuts the classifier in two at the input of the lowest trainable block:
# a frozen prefix (raw images -> activations, computed once and cached) and a trainable part
# (activations -> class probabilities, trained on the cache). Both are built from the
# classifier's own layer objects, so training the trainable part trains the classifier in place:
# the stitched model *is* the classifier that :func:`build_classifier` built.

#: The cut of depth 0: the head trains on the pooled output of the whole backbone.
POOLED = "avg_pool"


def frozen_cut(backbone: keras.Model, depth: int) -> str:
    """Name of the layer whose output feeds the trainable part at unfreeze depth ``depth``.

    ``"avg_pool"`` (the pooled backbone output) for depth 0; else the output of the block below
    the first unfrozen one (``conv4_block6_out`` for depth 3 of ResNet50), or of the stem
    (``pool1_pool``) when every block is unfrozen.

    Raises:
        ValueError: ``depth`` is negative or larger than the number of blocks.
    """
    if depth == 0:
        return POOLED
    return _cut_tensor(backbone, depth)[0]


def frozen_cut_shape(backbone: keras.Model, depth: int) -> tuple[int, ...]:
    """The shape of one image's activations at the cut of ``depth`` (see :func:`frozen_cut`)."""
    if depth == 0:
        return (int(backbone.output.shape[-1]),)
    return tuple(int(d) for d in _cut_tensor(backbone, depth)[1].shape[1:])


def _cut_tensor(backbone: keras.Model, depth: int):
    block_of, blocks = _blocks_for_depth(backbone, depth)
    first_unfrozen = blocks[len(blocks) - depth]
    # A block is fed by one tensor: what its first layer (in build order) takes in.
    first_layer = next(layer for layer in backbone.layers if block_of[layer.name] == first_unfrozen)
    tensor = first_layer.input
    return tensor._keras_history.operation.name, tensor


def _head_layers(classifier: keras.Model) -> tuple[layers.Layer, list[layers.Layer]]:
    """The classifier's pooling layer and the layers after it (Dense, [Dropout], logits, softmax)."""
    pool = classifier.get_layer(POOLED)
    chain = classifier.layers[classifier.layers.index(pool) + 1 :]
    return pool, chain


def build_feature_extractor(classifier: keras.Model, depth: int) -> keras.Model:
    """The frozen prefix: raw images -> the activations the trainable part starts from.

    Augmentation layers are left out: features are cached only when augmentation is off.

    Args:
        classifier: A model built by :func:`build_classifier`.
        depth: The unfreeze depth; 0 gives the pooled backbone output (what the head sees).
    """
    return build_cuts_extractor(classifier, [depth])


def build_cuts_extractor(classifier: keras.Model, depths: Sequence[int]) -> keras.Model:
    """The frozen prefixes of several unfreeze depths in one model: one pass, one output per depth.

    Output ``i`` is the activations at the cut of ``depths[i]`` (:func:`frozen_cut`): every cut
    lies on the way to the pooled output, so one pass over the images gives them all. With one
    depth, the model has that one output (:func:`build_feature_extractor`).

    Args:
        classifier: A model built by :func:`build_classifier`.
        depths: Unfreeze depths, each giving its cut (0: the pooled backbone output).
    """
    backbone = find_backbone(classifier)
    size = backbone.input_shape[1]
    inputs = keras.Input(shape=(size, size, 3), name="image")
    x = classifier.get_layer(PREPROCESS_LAYER)(inputs)
    tensors = [backbone.output if depth == 0 else _cut_tensor(backbone, depth)[1] for depth in depths]
    prefixes = keras.Model(backbone.input, tensors, name="frozen_prefixes")
    outputs = prefixes(x, training=False)
    outputs = [classifier.get_layer(POOLED)(out) if depth == 0 else out for depth, out in zip(depths, outputs)]
    name = "frozen_prefix_" + "_".join(str(depth) for depth in depths)
    return keras.Model(inputs, outputs[0] if len(outputs) == 1 else outputs, name=name)


def build_trainable_part(classifier: keras.Model, depth: int) -> keras.Model:
    """The trainable part: cut activations -> class probabilities, sharing the classifier's layers.

    Train it through :func:`compile_for_training` (its logits), as the classifier.

    Depth 0 gives the head alone (pooled features in); depth ``k`` gives the top ``k`` residual
    blocks (BatchNorm in inference mode, as in the classifier) followed by the head.

    Args:
        classifier: A model built by :func:`build_classifier`.
        depth: The unfreeze depth.
    """
    backbone = find_backbone(classifier)
    pool, chain = _head_layers(classifier)
    if depth == 0:
        inputs = keras.Input(shape=tuple(pool.output.shape[1:]), dtype=pool.output.dtype, name="features")
        x = inputs
    else:
        name, cut = _cut_tensor(backbone, depth)
        inputs = keras.Input(shape=tuple(cut.shape[1:]), dtype=cut.dtype, name=name)
        suffix = keras.Model(cut, backbone.output, name="unfrozen_blocks")
        x = suffix(inputs, training=False)
        x = pool(x)
    for layer in chain:
        x = layer(x)
    return keras.Model(inputs, x, name=f"trainable_part_{depth}")

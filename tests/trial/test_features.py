"""The frozen-feature cache: same numbers as without it, one valid entry per key, invalidation."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import autofinetune.trial.model as model_module  # noqa: E402
from autofinetune.trial.backbones import build_backbone  # noqa: E402
from autofinetune.spec import parse_spec  # noqa: E402
from autofinetune.spec.objectives import EPOCH_METRICS  # noqa: E402
from autofinetune.data.sources import ImageData, fingerprint_arrays, load_data  # noqa: E402
from autofinetune.trial.feature_keys import FeatureKey, feature_key  # noqa: E402
from autofinetune.trial.features import FeatureCache, cached_features  # noqa: E402
from autofinetune.trial.model import (  # noqa: E402
    build_classifier,
    build_feature_extractor,
    build_trainable_part,
    compile_for_training,
    frozen_cut,
    unfreeze_top_blocks,
)
from autofinetune.trial.reuse import KeptModels  # noqa: E402
from autofinetune.trial.schedule import run_trial  # noqa: E402
from autofinetune.search.space import complete_params  # noqa: E402

from conftest import REPO_ROOT, tiny_spec_dict  # noqa: E402


def _run_capturing_model(monkeypatch, spec, params, data, **kwargs):
    """run_trial, plus the classifier it trained (to compare final weights): the one it built,
    or the one of the same head kept from an earlier trial of this process."""
    built = []
    original = model_module.build_classifier
    original_kept = KeptModels.classifier_like

    def capture(*args, **kw):
        built.append(original(*args, **kw))
        return built[-1]

    def capture_kept(self, fresh):
        built.append(original_kept(self, fresh))
        return built[-1]

    monkeypatch.setattr(model_module, "build_classifier", capture)
    monkeypatch.setattr(KeptModels, "classifier_like", capture_kept)
    result = run_trial(spec, params, data, **kwargs)
    return result, built[-1].get_weights()


@pytest.mark.parametrize("depth", [0, 7, 16])
def test_cached_trial_equals_uncached_trial(tiny_spec, tmp_path, monkeypatch, depth):
    spec = tiny_spec(data={"batch_size": 15})  # 36 training images: 3 batches, the last one smaller
    data = load_data(spec)
    # Weight decay in both phases: the cached parts' retunable optimizers decay as Keras's own.
    params = complete_params(
        spec, {"unfreeze_depth": depth, "head_units": 8, "phase1_lr": 3e-3, "phase2_lr": 3e-3, "dropout": 0.25,
               "phase1_weight_decay": 0.3, "phase2_weight_decay": 0.1}
    )
    cache = FeatureCache(tmp_path / "cache")

    plain, plain_weights = _run_capturing_model(monkeypatch, spec, params, data, feature_cache=False)
    cached, cached_weights = _run_capturing_model(monkeypatch, spec, params, data, feature_cache=cache)

    assert [p.cached for p in plain.phases] == [False, False]
    assert [p.cached for p in cached.phases] == [True, True]
    assert [(r.step, r.phase) for r in cached.history] == [(r.step, r.phase) for r in plain.history]
    for a, b in zip(plain.history, cached.history):
        assert set(a.metrics) == set(b.metrics) == set(EPOCH_METRICS)
        for name in a.metrics:
            assert b.metrics[name] == pytest.approx(a.metrics[name], rel=1e-5, abs=1e-6), (a.step, name)
    assert len(plain_weights) == len(cached_weights)
    for a, b in zip(plain_weights, cached_weights):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert cached.unfrozen_blocks == plain.unfrozen_blocks
    assert [p.trainable_params for p in cached.phases] == [p.trainable_params for p in plain.phases]

    n = len(data.x_train) + len(data.x_val)
    counts = cached.extra["cache"]
    # Phase 2 reads what phase 1's one pass over the images stored: the pooled features
    # (depth 0) or the activations at its own cut, computed in the same pass.
    assert (counts["misses"], counts["hits"]) == (1, 1)
    assert counts["backbone_image_passes"] == n
    assert counts["layers"] == ["avg_pool", frozen_cut(build_backbone("tiny_resnet", image_size=16), depth)]
    assert plain.extra["cache"]["backbone_image_passes"] == 4 * n  # 2 + 2 epochs, every image each
    assert plain.extra["cache"]["enabled"] is False

    if depth == 0:  # a second trial of the study pays nothing for the frozen part
        again = run_trial(spec, params, data, feature_cache=cache)
        assert again.extra["cache"]["misses"] == 0 and again.extra["cache"]["backbone_image_passes"] == 0
        assert [p.cache_note for p in again.phases] == ["avg_pool: read from the cache"] * 2


def test_one_pass_fills_the_cuts_of_every_depth_the_search_allows(tiny_spec, tmp_path):
    spec = tiny_spec(search={"unfreeze_depth": {"low": 0, "high": 3}})
    data = load_data(spec)
    n = len(data.x_train) + len(data.x_val)
    cache = FeatureCache(tmp_path / "cache")
    params = complete_params(spec, {"unfreeze_depth": 2, "head_units": 8})

    first = run_trial(spec, params, data, feature_cache=cache)

    backbone = build_backbone("tiny_resnet", image_size=16)
    cuts = ["avg_pool", *(frozen_cut(backbone, depth) for depth in (1, 2, 3))]
    stored = sorted(json.loads(p.read_text())["key"]["layer"] for p in (tmp_path / "cache").glob("*.json"))
    assert stored == sorted(cuts)
    assert first.extra["cache"]["backbone_image_passes"] == n and first.extra["cache"]["misses"] == 1
    # What the shared pass stored at a cut is what that cut's own extractor computes.
    keras.utils.set_random_seed(spec.seed)
    classifier = build_classifier(build_backbone("tiny_resnet", image_size=16), num_classes=data.num_classes, head_units=8)
    alone = build_feature_extractor(classifier, 3).predict_on_batch(data.x_train[:8])
    entry = cached_features(cache, feature_key(spec, data, cuts[3]), build_feature_extractor(classifier, 3), data)
    assert entry.hit
    np.testing.assert_allclose(entry.train[:8], np.asarray(alone), rtol=1e-6, atol=1e-6)

    # A later trial at another depth of the space pays no pass over the images.
    other = run_trial(spec, complete_params(spec, {"unfreeze_depth": 3, "head_units": 16}), data, feature_cache=cache)
    assert other.extra["cache"]["misses"] == 0 and other.extra["cache"]["backbone_image_passes"] == 0
    assert [p.cache_note for p in other.phases] == ["avg_pool: read from the cache", f"{cuts[3]}: read from the cache"]


def test_other_depths_cuts_are_filled_only_within_a_share_of_the_disk_budget(tiny_spec, tmp_path):
    spec = tiny_spec(search={"unfreeze_depth": {"low": 0, "high": 3}})
    data = load_data(spec)
    n = len(data.x_train) + len(data.x_val)
    backbone = build_backbone("tiny_resnet", image_size=16)
    sizes = {d: n * 4 * int(np.prod(model_module.frozen_cut_shape(backbone, d))) for d in range(4)}
    params = complete_params(spec, {"unfreeze_depth": 2, "head_units": 8})
    # A sixteenth of the budget holds depth 1's cut, then nothing more; then not even that.
    for max_bytes, depths in ((16 * sizes[1], (0, 2, 1)), (16 * sizes[1] - 1, (0, 2))):
        assert sizes[0] + sizes[2] + sizes[1] <= max_bytes - 1  # the trial's own entries are stored
        folder = tmp_path / f"cache-{max_bytes}"
        run_trial(spec, params, data, feature_cache=FeatureCache(folder, max_bytes=max_bytes))
        stored = sorted(json.loads(p.read_text())["key"]["layer"] for p in folder.glob("*.json"))
        assert stored == sorted(frozen_cut(backbone, d) for d in depths), max_bytes


def test_entries_computed_together_take_one_fill_and_skip_the_stored_ones(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.get_or_compute(_fake_key("b"), (2, 3), lambda out: out.fill(7.0))
    calls = []

    def fill(outs):
        calls.append([None if out is None else out.shape for out in outs])
        for value, out in enumerate(outs):
            if out is not None:
                out.fill(value)

    wanted = [(_fake_key("a"), (2, 5)), (_fake_key("b"), (2, 3)), (_fake_key("c"), (2, 4))]
    found = cache.get_or_compute_many(wanted, fill)
    assert calls == [[(2, 5), None, (2, 4)]]
    assert [f.hit for f in found] == [False, True, False]
    assert [float(f.array[0, 0]) for f in found] == [0.0, 7.0, 2.0]
    assert found[0].seconds == found[2].seconds > 0
    again = cache.get_or_compute_many(wanted, fill)
    assert len(calls) == 1 and all(f.hit for f in again)
    assert not list(tmp_path.glob(".*.tmp"))


def _times_traced(model) -> int:
    """How often TensorFlow traced the model's train and test steps (the tf.functions that
    Keras's TensorFlow trainer keeps in the closures of ``train_function``/``test_function``)."""
    functions = [model.train_function, model.test_function]
    cells = [cell.cell_contents for function in functions for cell in function.__closure__ or ()]
    return sum(f.experimental_get_tracing_count() for f in cells if hasattr(f, "experimental_get_tracing_count"))


@pytest.mark.parametrize("mixed_precision", ["off", "mixed_float16"])
def test_a_trial_on_models_kept_from_an_earlier_trial_trains_as_on_new_ones(
    tiny_spec, tmp_path, monkeypatch, mixed_precision
):
    """Same head and depth, other learning rates, momenta and weight decays (0 included): the second trial
    runs both phases on the first one's compiled parts, traces nothing, and trains exactly as
    a trial that builds everything anew (under mixed_float16 too, where a loss-scale optimizer
    wraps the retunable one and its scale is reset as well)."""
    import threading

    from autofinetune.trial.session import TrialSession

    spec = tiny_spec(data={"batch_size": 15}, performance={"mixed_precision": mixed_precision})
    data = load_data(spec)
    cache = FeatureCache(tmp_path / "cache")
    first = complete_params(spec, {"unfreeze_depth": 2, "head_units": 8, "dropout": 0.25, "phase1_momentum": 0.5,
                                   "phase1_lr": 1e-2, "phase2_lr": 1e-3, "phase2_momentum": 0.9,
                                   "phase1_weight_decay": 0.0, "phase2_weight_decay": 0.2})
    second = complete_params(spec, {"unfreeze_depth": 2, "head_units": 8, "dropout": 0.25, "phase1_momentum": 0.0,
                                    "phase1_lr": 3e-3, "phase2_lr": 3e-3, "phase2_momentum": 0.6,
                                    "phase1_weight_decay": 0.4, "phase2_weight_decay": 0.0})

    # A worker's first trial, then a worker whose first trial had the same head.
    on_new, new_weights = _run_capturing_model(monkeypatch, spec, second, data, feature_cache=cache,
                                               session=TrialSession())
    assert on_new.extra["performance"]["phases_on_kept_models"] == 0

    session = TrialSession()
    opener = run_trial(spec, first, data, feature_cache=cache, session=session)
    assert opener.extra["performance"]["phases_on_kept_models"] == 0
    parts = [kept.model for kept in session.models.parts.values()]
    assert len(parts) == 2  # the head alone (phase 1) and two blocks + head (phase 2)
    traced = [_times_traced(part) for part in parts]
    assert all(count > 0 for count in traced)
    on_kept, kept_weights = _run_capturing_model(monkeypatch, spec, second, data, feature_cache=cache,
                                                 session=session)

    assert on_kept.extra["performance"]["phases_on_kept_models"] == 2
    assert [_times_traced(part) for part in parts] == traced
    assert [(r.step, r.phase) for r in on_kept.history] == [(r.step, r.phase) for r in on_new.history]
    for a, b in zip(on_new.history, on_kept.history):
        for name in a.metrics:
            assert b.metrics[name] == pytest.approx(a.metrics[name], rel=1e-6, abs=1e-7), (a.step, name)
    assert len(new_weights) == len(kept_weights)
    for a, b in zip(new_weights, kept_weights):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)

    # A fit stopped part-way leaves its part in an unknown state: it is not kept.
    stop = threading.Event()
    stop.set()
    with pytest.raises(KeyboardInterrupt):
        run_trial(spec, second, data, feature_cache=cache, stop_event=stop, session=session)
    assert parts[0] not in [kept.model for kept in session.models.parts.values()]


def test_cut_points_follow_block_names():
    backbone = build_backbone("tiny_resnet", image_size=16)
    assert frozen_cut(backbone, 0) == "avg_pool"
    assert frozen_cut(backbone, 1) == "conv5_block2_out"
    assert frozen_cut(backbone, 3) == "conv4_block6_out"
    assert frozen_cut(backbone, 15) == "conv2_block1_out"
    assert frozen_cut(backbone, 16) == "pool1_pool"
    with pytest.raises(ValueError, match=r"unfreeze_depth must be in \[0, 16\], but got 17"):
        frozen_cut(backbone, 17)


@pytest.mark.parametrize("depth", [0, 5])
def test_stitched_classifier_predicts_like_the_trainable_part(tmp_path, depth):
    keras.utils.set_random_seed(1)
    backbone = build_backbone("tiny_resnet", image_size=16)
    classifier = build_classifier(backbone, num_classes=3, head_units=8)
    unfreeze_top_blocks(backbone, depth)
    extractor = build_feature_extractor(classifier, depth)
    part = build_trainable_part(classifier, depth)
    assert not extractor.trainable_weights
    raw = np.random.default_rng(0).integers(0, 256, size=(12, 16, 16, 3)).astype("uint8")
    labels = keras.utils.to_categorical(np.arange(12) % 3, 3)

    # Training the trainable part trains the classifier: they share layers and weights.
    before = [np.array(w) for w in classifier.get_weights()]
    view = compile_for_training(part, keras.optimizers.SGD(learning_rate=0.05))
    view.fit(extractor.predict(raw, verbose=0), labels, epochs=1, batch_size=4, verbose=0)
    changed = [not np.array_equal(a, np.array(b)) for a, b in zip(before, classifier.get_weights())]
    assert any(changed)

    via_cache = part.predict(extractor.predict(raw, verbose=0), verbose=0)
    np.testing.assert_allclose(classifier.predict(raw, verbose=0), via_cache, rtol=1e-5, atol=1e-6)
    # The stitched model is the exportable one: raw images in, same numbers after a reload.
    path = tmp_path / "stitched.keras"
    classifier.save(path)
    np.testing.assert_allclose(keras.models.load_model(path).predict(raw, verbose=0), via_cache, rtol=1e-5, atol=1e-6)


_WORKER = """
import json, sys, time, pathlib
sys.path.insert(0, sys.argv[3])
from conftest import tiny_spec_dict
from autofinetune.spec import parse_spec
from autofinetune.data.sources import load_data
from autofinetune.trial.feature_keys import feature_key
from autofinetune.trial.features import FeatureCache, cached_features
from autofinetune.trial.backbones import build_backbone
from autofinetune.trial.model import build_classifier, build_feature_extractor, frozen_cut
import keras, numpy as np, hashlib
spec = parse_spec(tiny_spec_dict(), base_dir=sys.argv[1])
data = load_data(spec)
keras.utils.set_random_seed(spec.seed)
classifier = build_classifier(build_backbone("tiny_resnet", image_size=16), num_classes=3, head_units=8)
extractor = build_feature_extractor(classifier, 4)
key = feature_key(spec, data, frozen_cut(classifier.get_layer("tiny_resnet"), 4))
go = pathlib.Path(sys.argv[2])
while not go.exists():  # start together
    time.sleep(0.01)
found = cached_features(FeatureCache(sys.argv[1] + "/cache"), key, extractor, data)
rows = np.concatenate([found.train, found.val])
print(json.dumps({"hit": found.hit, "sha": hashlib.sha256(rows.tobytes()).hexdigest()}))
"""


@pytest.mark.slow
def test_two_workers_building_the_same_cache_end_with_one_valid_entry(tmp_path):
    go = tmp_path / "go"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(tmp_path), str(go), str(REPO_ROOT / "tests")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        )
        for _ in range(2)
    ]
    time.sleep(1.0)
    go.touch()
    outputs = []
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))

    folder = tmp_path / "cache"
    entries = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert len([e for e in entries if e.endswith(".npy")]) == 1, entries
    assert not list(folder.glob(".*.tmp"))
    assert outputs[0]["sha"] == outputs[1]["sha"]
    # One computed it, the other waited for the lock and read it.
    assert sorted(o["hit"] for o in outputs) == [False, True]
    stored = np.load(next(folder.glob("*.npy")))
    assert stored.dtype == np.float32 and np.isfinite(stored).all()


def _fake_key(name: str = "x", dtype: str = "float32") -> FeatureKey:
    return FeatureKey(backbone="b", weights="w", image_size=8, data=name, layer="l", dtype=dtype)


def test_concurrent_writers_without_a_lock_still_publish_a_whole_file(tmp_path):
    """Where file locks do not work, both workers compute; the atomic replace keeps one valid file."""
    cache = FeatureCache(tmp_path, file_locks=False)
    started = threading.Barrier(2)
    answers = []

    def fill(out):
        started.wait()
        for row in range(len(out)):
            out[row] = row
            time.sleep(0.001)

    def work():
        answers.append(cache.get_or_compute(_fake_key(), (200, 16), fill))

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.hit for a in answers] == [False, False]
    assert [p.name for p in tmp_path.glob("*.npy")] == [cache.path_of(_fake_key()).name]
    assert not list(tmp_path.glob(".*.tmp"))
    np.testing.assert_array_equal(cache.load(_fake_key(), (200, 16))[:, 0], np.arange(200))


def _tiny_data(x_train, y_train, x_val, y_val) -> ImageData:
    return ImageData(
        x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val, class_names=("a", "b"),
        fingerprint=fingerprint_arrays(x_train, y_train, x_val, y_val, extra=("a", "b")), source="test",
    )


def _extractor(spec, image_size):
    keras.utils.set_random_seed(spec.seed)
    backbone = build_backbone("tiny_resnet", image_size=image_size, weights=spec.weights_path or "none")
    return build_feature_extractor(build_classifier(backbone, num_classes=2, head_units=4), 0)


def test_changed_image_size_or_weights_invalidate_the_cache(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    labels = np.array([0, 1, 0, 1, 0, 1], dtype=np.int32)
    data = _tiny_data(images[:4], labels[:4], images[4:], labels[4:])
    spec = parse_spec(tiny_spec_dict(), base_dir=tmp_path)
    cache = FeatureCache(tmp_path / "cache")
    extractor = _extractor(spec, 16)

    def lookup(spec, data, extractor, cache=cache):
        return cached_features(cache, feature_key(spec, data, "avg_pool", float16=cache.float16), extractor, data)

    first = lookup(spec, data, extractor)
    assert not first.hit and lookup(spec, data, extractor).hit
    np.testing.assert_array_equal(lookup(spec, data, extractor).train, first.train)
    # The cache runs the validation images in one padded batch with the training ones, predict runs
    # these two alone: another batch shape, another float32 round-off (a few 1e-6 seen on AVX2).
    np.testing.assert_allclose(first.val, extractor.predict(images[4:], verbose=0), rtol=1e-5, atol=1e-6)

    # One changed pixel: a new fingerprint, a new entry.
    changed = images.copy()
    changed[0, 0, 0, 0] ^= 1
    assert not lookup(spec, _tiny_data(changed[:4], labels[:4], changed[4:], labels[4:]), extractor).hit

    # Another image size.
    big = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)
    assert not lookup(spec, _tiny_data(big[:4], labels[:4], big[4:], labels[4:]), _extractor(spec, 32)).hit

    # Another seed for random weights.
    reseeded = parse_spec(tiny_spec_dict(seed=1), base_dir=tmp_path)
    assert not lookup(reseeded, data, _extractor(reseeded, 16)).hit

    # A weights file; then the file replaced by other weights.
    weights_file = tmp_path / "tiny.weights.h5"
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        build_backbone("tiny_resnet", image_size=16).save_weights(weights_file)
        from_file = parse_spec(tiny_spec_dict(backbone={"weights": str(weights_file)}), base_dir=tmp_path)
        assert not lookup(from_file, data, _extractor(from_file, 16)).hit, seed
        assert lookup(from_file, data, extractor).hit, seed  # same file: a hit (never runs the extractor)

    # float16 storage is its own entry.
    half = lookup(spec, data, extractor, cache=FeatureCache(tmp_path / "cache", float16=True))
    assert not half.hit and half.train.dtype == np.float16
    np.testing.assert_allclose(half.train.astype(np.float32), first.train, rtol=1e-3, atol=1e-3)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 7


def test_corrupt_entry_is_recomputed(tmp_path):
    cache = FeatureCache(tmp_path)
    key = _fake_key()
    cache.get_or_compute(key, (4, 3), lambda out: out.fill(1.0))
    cache.path_of(key).write_bytes(b"not a numpy file")
    again = cache.get_or_compute(key, (4, 3), lambda out: out.fill(2.0))
    assert not again.hit
    np.testing.assert_array_equal(cache.load(key, (4, 3)), np.full((4, 3), 2.0))


def test_disk_budget_evicts_least_recently_used(tmp_path):
    row_bytes = 1000 * 4
    cache = FeatureCache(tmp_path, max_bytes=3 * row_bytes + 3 * 200)  # three entries and their headers
    for name in "abc":
        cache.get_or_compute(_fake_key(name), (1, 1000), lambda out: out.fill(0.0))
        time.sleep(0.02)
    assert cache.get_or_compute(_fake_key("a"), (1, 1000), lambda out: None).hit  # "a" is now the newest
    cache.get_or_compute(_fake_key("d"), (1, 1000), lambda out: out.fill(0.0))
    kept = {p.name for p in tmp_path.glob("*.npy")}
    assert kept == {cache.path_of(_fake_key(n)).name for n in "acd"}
    assert cache.total_bytes() <= cache.max_bytes

    # An entry larger than the whole budget is computed for the caller but not stored.
    small = FeatureCache(tmp_path / "small", max_bytes=10)
    found = small.get_or_compute(_fake_key("e"), (1, 1000), lambda out: out.fill(3.0))
    assert not found.hit and not found.stored and float(found.array[0, 0]) == 3.0
    assert small.entries() == []


def test_augmentation_or_the_spec_switch_turn_the_cache_off(tiny_spec):
    spec = tiny_spec(schedule={"phase1_epochs": 1, "phase2_epochs": 0}, data={"augmentation": {"flip": "horizontal"}})
    result = run_trial(spec, complete_params(spec, {"head_units": 8}), load_data(spec))
    assert [p.cached for p in result.phases] == [False]
    assert "random augmentation" in result.phases[0].cache_note
    assert result.extra["cache"]["hits"] == result.extra["cache"]["misses"] == 0

    spec = tiny_spec(schedule={"phase1_epochs": 1, "phase2_epochs": 0}, cache={"enabled": False})
    result = run_trial(spec, complete_params(spec, {"head_units": 8}), load_data(spec))
    assert not result.phases[0].cached
    assert result.phases[0].cache_note == "off: cache.enabled = false"
    assert result.extra["cache"]["enabled"] is False


def test_unusable_cache_folder_costs_speed_not_the_trial(tiny_spec, tmp_path):
    (tmp_path / "not-a-folder").write_text("")
    spec = tiny_spec(schedule={"phase1_epochs": 1, "phase2_epochs": 0})
    result = run_trial(spec, complete_params(spec, {"head_units": 8}), load_data(spec),
                       feature_cache=FeatureCache(tmp_path / "not-a-folder"))
    assert result.state == "complete" and not result.phases[0].cached
    assert result.phases[0].cache_note.startswith("off: cache folder ")


def test_trainable_batchnorm_turns_the_cache_off(tiny_spec, monkeypatch):
    """Not in our schedule, but if a BatchNormalization layer were trainable, no cache."""
    original = model_module.unfreeze_top_blocks

    def unfreeze_with_batchnorm(backbone, depth):
        blocks = original(backbone, depth)
        backbone.get_layer("conv5_block3_3_bn").trainable = True
        return blocks

    monkeypatch.setattr(model_module, "unfreeze_top_blocks", unfreeze_with_batchnorm)
    spec = tiny_spec(schedule={"phase1_epochs": 1, "phase2_epochs": 1})
    result = run_trial(spec, complete_params(spec, {"head_units": 8, "unfreeze_depth": 1}), load_data(spec))
    assert [p.cached for p in result.phases] == [True, False]
    assert result.phases[1].cache_note == "off: BatchNormalization layer 'conv5_block3_3_bn' is trainable"


def test_shipped_demo_caches_by_default():
    from autofinetune.spec import load_spec

    spec = load_spec(REPO_ROOT / "studies" / "digits-demo.toml")
    assert spec.cache.enabled and not spec.cache.float16
    cache = FeatureCache.from_spec(spec, directory="somewhere")
    assert str(cache.directory) == "somewhere" and cache.max_bytes == spec.cache.max_bytes


def test_a_key_names_its_file_with_characters_every_file_system_takes():
    from autofinetune.trial.feature_keys import FeatureKey

    mine = FeatureKey(backbone="my_nets:small", weights="w", image_size=8, data="d", layer="blk2/out", dtype="float16")
    other = FeatureKey(backbone="my_nets_small", weights="w", image_size=8, data="d", layer="blk2/out", dtype="float16")
    assert mine.stem.startswith("my_nets_small-8px-blk2_out-float16-")
    assert mine.stem != other.stem  # the hash of the whole key keeps them apart

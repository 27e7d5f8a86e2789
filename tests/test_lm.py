"""The LSTM language model and its workload pieces: model, batch layouts, metrics, churn, tokenizer check.

A tiny dataset in the Common Crawl row layout is written with the real shard writer
(`tests/lm_data.py`); DeepSpeed training of the workload is in tests/test_lm_training.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from codistill.config import ConfigError, parse_experiment
from codistill.datasets.commoncrawl import LSTMConfig
from codistill.dataset import DatasetError, join, load_manifest
from pipelines.formats import read_shard
from training.data import StreamSpec
from training.lstm import LSTMLanguageModel
from training.workloads import lm

from lm_data import BYTES_PER_TOKEN, EOD, PAD, TOKENIZER, VOCAB, write_lm_dataset

pytestmark = pytest.mark.timeout(120)

SMALL = LSTMConfig(embedding_dim=8, hidden=12, layers=2, window=5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lm-data"))
    write_lm_dataset(root)
    return root, load_manifest(root)


def group_stream(root, manifest, group) -> list[int]:
    """Group `group`'s real tokens in shard order, and the run of rows each came from."""
    tokens = []
    for shard in manifest.shards_of("train", group):
        for block in read_shard(join(root, shard.path), manifest.features, manifest.format):
            tokens += [row[:n].tolist() for row, n in zip(block["tokens"], block["length"])]
    return tokens


def lm_config(output: str = "runs/unused", **model):
    return parse_experiment({"name": "x", "data": {"dataset": "commoncrawl", "input": "unused", "output": output},
                             "model": {"kind": "lstm", **model}})


def spec_for(root, manifest, streams, rank=0, world=1, repeat=False):
    return StreamSpec(root, manifest, tuple(manifest.shards_of("train", 0)), streams, rank, world, repeat=repeat)


# --- model ------------------------------------------------------------------------------------------------


def test_carried_state_equals_one_long_forward():
    torch.manual_seed(0)
    model = LSTMLanguageModel(SMALL, VOCAB).eval()
    tokens = torch.randint(0, VOCAB, (3, 20))
    whole, _ = model(tokens)
    state, pieces = None, []
    for start in range(0, 20, 5):
        logits, state = model(tokens[:, start:start + 5], state)
        pieces.append(logits)
        assert all(not h.requires_grad and not c.requires_grad for h, c in state)
    torch.testing.assert_close(torch.cat(pieces, 1), whole)


@pytest.mark.parametrize("hidden", [8, 12])
def test_tied_embeddings_share_the_input_matrix(hidden):
    model = LSTMLanguageModel(LSTMConfig(embedding_dim=8, hidden=hidden, layers=2), VOCAB)
    names = dict(model.named_parameters())
    assert "output.weight" not in names and ("projection.weight" in names) == (hidden != 8)
    logits, _ = model(torch.zeros(2, 3, dtype=torch.long))
    logits.sum().backward()
    assert model.embedding.weight.grad is not None and logits.shape == (2, 3, VOCAB)
    untied = LSTMLanguageModel(LSTMConfig(embedding_dim=8, hidden=hidden, tie_embeddings=False), VOCAB)
    assert untied.output.weight.shape == (VOCAB, hidden)


def test_layer_norm_normalises_each_layers_outputs():
    model = LSTMLanguageModel(SMALL, VOCAB)
    assert [type(n).__name__ for n in model.norms] == ["LayerNorm", "LayerNorm"]
    plain = LSTMLanguageModel(LSTMConfig(embedding_dim=8, hidden=12, layer_norm=False), VOCAB)
    assert [type(n).__name__ for n in plain.norms] == ["Identity", "Identity"]


@pytest.mark.parametrize("key, value, message", [
    ("hidden", 0, "model.hidden: must be >= 1, got 0"),
    ("window", -1, "model.window: must be >= 1, got -1"),
    ("dropout", 1.0, r"model.dropout: must be in \[0, 1\), got 1.0"),
    ("layout", "rows", "model.layout: must be one of"),
    ("restart", "carry", "model.restart: must be one of"),
    ("layers", "two", "model.layers: expected int"),
])
def test_model_config_errors_name_the_field(key, value, message):
    with pytest.raises(ConfigError, match=message):
        lm_config(**{key: value})


def test_build_model_takes_the_vocabulary_from_the_dataset(dataset):
    _, manifest = dataset
    model = lm.build_model(SMALL, manifest)
    assert model.embedding.num_embeddings == VOCAB


def test_a_dataset_without_tokenizer_facts_is_refused(dataset):
    import dataclasses

    _, manifest = dataset
    with pytest.raises(DatasetError, match="extra.tokenizer.vocab_size"):
        lm.build_model(SMALL, dataclasses.replace(manifest, extra={}))


def test_training_refuses_a_dataset_tokenized_with_another_model(dataset, tmp_path):
    _, manifest = dataset
    good, other = tmp_path / "good.model", tmp_path / "other.model"
    good.write_bytes(TOKENIZER)
    other.write_bytes(TOKENIZER + b"retrained")
    assert lm.check_tokenizer(manifest, str(good)) == manifest.tokenizer_sha256
    with pytest.raises(DatasetError, match="sha256"):
        lm.check_tokenizer(manifest, str(other))
    with pytest.raises(DatasetError, match="does not exist"):
        lm.check_tokenizer(manifest, str(tmp_path / "missing.model"))


# --- batch layouts ------------------------------------------------------------------------------------------


def test_packed_batches_shift_by_one_and_mask_padding(dataset):
    root, manifest = dataset
    spec = StreamSpec(root, manifest, tuple(manifest.shards_of("train", 0)), 8)
    batch = next(iter(lm.batches(spec, lm_config(layout="packed", output=root), True)))
    assert "reset" not in batch and batch["inputs"].shape == (8, 16)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    last = list(lm.batches(spec, lm_config(layout="packed", output=root), True))[-1]
    short = last["mask"].sum(1) < 16
    assert short.any(), "the shard's last row is padded"


def test_eval_batches_predict_every_real_token_once(dataset):
    root, manifest = dataset
    spec = StreamSpec(root, manifest, tuple(manifest.shards_of("eval")), 7)
    batches = list(lm.batches(spec, lm_config(), False))
    rows = [r for b in batches for r in zip(b["inputs"], b["targets"], b["mask"])]
    assert all(inp[0] == EOD for inp, _, _ in rows)
    real = sum(int(m.sum()) for _, _, m in rows)
    assert real == manifest.extra["tokens"]["eval"]
    assert all((t[~m] == PAD).all() for _, t, m in rows)


@pytest.mark.parametrize("world, streams", [(1, 3), (2, 2)])
def test_stateful_streams_read_every_token_in_order(dataset, world, streams):
    root, manifest = dataset
    rows = group_stream(root, manifest, 0)
    per_stream = len(rows) // (world * streams)
    expected = [sum(rows[s * per_stream:(s + 1) * per_stream], []) for s in range(world * streams)]
    window = 5
    steps = []
    for rank in range(world):
        it = lm.TokenStreams(spec_for(root, manifest, streams, rank, world), window, PAD, history=True)
        got = [[] for _ in range(streams)]
        previous = None
        for i, batch in enumerate(it):
            assert batch["inputs"].shape == batch["targets"].shape == (streams, window)
            assert batch["reset"].tolist() == [i == 0] * streams
            if previous is not None:
                np.testing.assert_array_equal(batch["history"], previous["inputs"])
                np.testing.assert_array_equal(batch["inputs"][:, 0], previous["targets"][:, -1])
            for b in range(streams):
                if i == 0:
                    got[b].append(int(batch["inputs"][b, 0]))
                got[b] += batch["targets"][b][batch["mask"][b]].tolist()
            previous = batch
        steps.append(i + 1)
        for b in range(streams):  # each stream's real tokens, in order (the last < window + 1 may be cut)
            want = expected[rank * streams + b]
            assert got[b] == want[:len(got[b])] and len(want) - len(got[b]) <= window
    assert len(set(steps)) == 1 and steps[0] == it.windows_per_epoch, "every rank takes the same number of steps"


def test_stateful_streams_repeat_deterministically_and_reset_at_each_epoch(dataset):
    root, manifest = dataset
    streams = lm.TokenStreams(spec_for(root, manifest, 2, repeat=True), 5, PAD, history=False)
    n = streams.windows_per_epoch
    first = [b for _, b in zip(range(2 * n + 1), streams)]
    again = [b for _, b in zip(range(2 * n + 1), streams)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert [bool(b["reset"].all()) for b in first] == [True] + [False] * (n - 1) + [True] + [False] * (n - 1) + [True]
    np.testing.assert_array_equal(first[0]["inputs"], first[n]["inputs"])
    assert "history" not in first[0]


def test_stateful_streams_read_each_shard_once_with_its_size_checked(dataset, monkeypatch):
    """8 streams over 2 shards: every stream inside a shard shares one verified read of it."""
    root, manifest = dataset
    reads = []

    def counted(url, *args, **kwargs):
        reads.append((url, kwargs.get("expect_bytes")))
        return read_shard(url, *args, **kwargs)

    monkeypatch.setattr(lm, "read_shard", counted)
    streams = lm.TokenStreams(spec_for(root, manifest, 8), 5, PAD, history=False)
    assert sum(1 for _ in streams) == streams.windows_per_epoch
    assert sorted(reads) == sorted((join(root, s.path), s.bytes) for s in manifest.shards_of("train", 0))


def test_too_many_streams_is_a_clear_error(dataset):
    root, manifest = dataset
    with pytest.raises(DatasetError, match="stateful layout"):
        lm.TokenStreams(spec_for(root, manifest, 10_000), 5, PAD, history=False)


def test_a_restarted_state_warms_up_on_the_previous_window(dataset):
    root, manifest = dataset
    torch.manual_seed(0)
    model = LSTMLanguageModel(SMALL, VOCAB).eval()
    batches = [{k: torch.from_numpy(v) for k, v in b.items() if k != "key"}
               for _, b in zip(range(3), lm.TokenStreams(spec_for(root, manifest, 2), 5, PAD, history=True))]
    with torch.no_grad():
        _, carried = lm.forward(model, batches[0], None)  # window 0: reset, no warm-up
        _, carried = lm.forward(model, batches[1], carried)
        logits, _ = lm.forward(model, batches[2], carried)
        restarted, _ = lm.forward(model, batches[2], None)  # e.g. a newly adopted peer
        _, warm = model(batches[1]["inputs"])
        expected, _ = model(batches[2]["inputs"], warm)
    torch.testing.assert_close(restarted, expected)
    assert not torch.allclose(restarted, logits)  # the warm-up only sees one window, not the whole history


def test_the_zero3_eval_placeholder_runs_one_forward_like_an_eval_batch(dataset):
    """Under ZeRO-3 a rank out of eval rows forwards a placeholder in step with the others (every forward is a
    collective). A row cut from a mid-stream training batch (`history`, no reset: a resumed run) would run a
    warm-up forward first, two in all, and the ranks' collectives would fall out of step."""
    from training.data import to_torch
    from training.train import eval_placeholder

    root, manifest = dataset
    config = lm_config(output=root, embedding_dim=8, hidden=12, window=5)  # stateful, restart: warmup
    eval_shards = tuple(manifest.shards_of("eval"))
    placeholder = eval_placeholder(lm.WORKLOAD, StreamSpec(root, manifest, eval_shards, 4, rank=1, world=2), config)
    first = next(iter(lm.batches(StreamSpec(root, manifest, eval_shards, 4), config, False)))
    assert placeholder.keys() == first.keys() and len(placeholder["key"]) == 1
    np.testing.assert_array_equal(placeholder["inputs"], first["inputs"][:1])

    torch.manual_seed(0)
    model = lm.build_model(config.model, manifest).eval()
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    windows = iter(lm.TokenStreams(spec_for(root, manifest, 2), 5, PAD, history=True))
    next(windows)
    mid_stream = next(windows)
    assert not mid_stream["reset"].any()
    with torch.no_grad():
        lm.forward(model, to_torch({k: v[:1] for k, v in mid_stream.items()}), None)
        assert len(forwards) == 2  # the old placeholder, cut from a training batch
        lm.forward(model, to_torch(placeholder), None)
    assert len(forwards) == 3


# --- metrics ------------------------------------------------------------------------------------------------


def test_eval_rows_and_metrics_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]],
                                     [[0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]]]))
    batch = {"targets": np.array([[0, 1], [2, 0]]), "mask": np.array([[True, True], [True, False]]),
             "text_bytes": np.array([4, 2])}
    rows = lm.eval_rows(logits, batch)
    np.testing.assert_allclose(rows["nll"], [-math.log(0.5) - math.log(0.8), -math.log(0.6)])
    assert rows["tokens"].tolist() == [2, 1] and rows["argmax"].tolist() == [[0, 1], [2, -1]]

    class Manifest:
        extra = {"floor": {"metric": "bits_per_byte", "value": 0.1}}

    metrics = lm.eval_metrics(rows, Manifest())
    nll = -math.log(0.5) - math.log(0.8) - math.log(0.6)
    assert metrics["loss"] == pytest.approx(nll / math.log(2) / 6) == metrics["bits_per_byte"]
    assert metrics["cross_entropy"] == pytest.approx(nll / 3)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / 3))
    assert metrics["rows"] == 2 and metrics["floor"] == 0.1 and metrics["tokens"] == 3
    assert "bits/byte (floor 0.1000)" in lm.describe(metrics)


def test_churn_counts_argmax_disagreement_on_real_positions_only():
    a = {"argmax": np.array([[1, 2, -1], [3, 4, 5]]), "nll": np.array([2.0, 3.0]), "tokens": np.array([2, 3])}
    b = {"argmax": np.array([[1, 0, -1], [3, 4, 0]]), "nll": np.array([1.0, 3.0]), "tokens": np.array([2, 3])}
    out = lm.churn(a, b)
    assert out["disagreement"] == pytest.approx(2 / 5) and out["positions"] == 5
    assert out["mean_abs_nll_diff"] == pytest.approx(0.25)
    assert lm.churn(a, a)["disagreement"] == 0.0
    assert "40.00% of 5 positions" in lm.describe_churn(out)


def test_bytes_per_token_of_the_test_data(dataset):
    root, manifest = dataset
    spec = StreamSpec(root, manifest, tuple(manifest.shards_of("eval")), 64)
    batch = next(iter(lm.batches(spec, lm_config(), False)))
    eod = ((batch["targets"] == EOD) & batch["mask"]).sum(1)
    np.testing.assert_array_equal(batch["text_bytes"], (batch["mask"].sum(1) - eod) * BYTES_PER_TOKEN)


def test_a_dataset_without_token_features_is_refused(dataset):
    import dataclasses

    from codistill.shards import Feature

    _, manifest = dataset
    criteo_like = dataclasses.replace(manifest, features={"key": Feature("bytes"), "label": Feature("float32")})
    with pytest.raises(DatasetError, match="feature 'tokens'"):
        lm.build_model(SMALL, criteo_like)


def test_stateful_streams_refuse_several_loader_workers(dataset):
    from torch.utils.data import DataLoader

    root, manifest = dataset
    streams = lm.TokenStreams(spec_for(root, manifest, 2), 5, PAD, history=False)

    class Dataset(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(streams)

    with pytest.raises(ValueError, match="loader.workers=2"):
        next(iter(DataLoader(Dataset(), batch_size=None, num_workers=2)))


def test_training_batches_refuse_a_dataset_of_another_tokenizer(dataset, tmp_path):
    import shutil

    root, _ = dataset
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    spec = StreamSpec(str(copy), load_manifest(str(copy)), tuple(load_manifest(str(copy)).shards_of("train", 0)), 2)
    config = lm_config(output=str(copy))
    lm.batches(spec, config, True)  # the dataset's own tokenizer: accepted
    (copy / "tokenizer" / "spm.model").write_bytes(TOKENIZER + b" retrained")
    with pytest.raises(DatasetError, match="tokenized with sentencepiece model sha256"):
        lm.batches(spec, config, True)
    lm.batches(spec, config, False)  # evaluating is reading, not training


@pytest.mark.parametrize("layout", ["packed", "stateful"])
def test_one_training_step_through_the_workload(dataset, layout):
    """batches -> forward -> targets -> the loss with a lazy peer -> backward, as the trainer chains them."""
    from codistill.config import CodistillConfig
    from training.loss import codistillation_loss
    from training.data import to_torch

    root, manifest = dataset
    config = lm_config(output=root, layout=layout, embedding_dim=8, hidden=12, window=5)
    spec = StreamSpec(root, manifest, tuple(manifest.shards_of("train", 0)), 4, repeat=True)
    batch = to_torch(next(iter(lm.WORKLOAD.batches(spec, config, True))))
    torch.manual_seed(0)
    student, peer = lm.build_model(config.model, manifest), lm.build_model(config.model, manifest).eval()
    logits, state = lm.WORKLOAD.forward(student, batch, None)
    assert (state is None) == (layout == "packed")

    def peers():
        with torch.no_grad():
            yield lm.WORKLOAD.forward(peer, batch, None)[0]

    targets, mask = lm.WORKLOAD.targets(batch)
    parts = codistillation_loss(logits, targets, peers(), 0, CodistillConfig(), binary=lm.WORKLOAD.binary, mask=mask)
    parts.total.backward()
    assert parts.distill_loss > 0 and student.embedding.weight.grad is not None

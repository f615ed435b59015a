"""Hugging Face transformers models as model.target: a GPT-2 built from a config mapping (nothing downloaded) on
BPE-tokenised shards. 2 ranks x accumulation = 1 rank (allreduce and fsdp by GPT2Block), the model's own loss =
Shoal's cross-entropy on its logits, below the unigram baseline, exact resume, export into GPT2LMHeadModel (state
dict and save_pretrained), and one clear line for each mismatch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_checkpoint import final_weights, run
from test_data_writer import shard
from test_engine import assert_params_close, run_steps
from test_tokens import _unigram_loss, documents

from shoal.config import DataConfig, JobConfig
from shoal.data import tokens
from shoal.data.partition import ShardPlan
from shoal.data.shards import open_shards
from shoal.dist import WorldInfo
from shoal.engine import train, train_step
from shoal.errors import ConfigError
from shoal.job import build_job

from _ranks import spawn_ranks
from conftest import shoal_cli

transformers = pytest.importorskip("transformers")

CAUSAL = "transformers:AutoModelForCausalLM.from_config"
GPT2 = {
    "model_type": "gpt2",
    "n_layer": 2,
    "n_head": 2,
    "n_embd": 32,
    "n_positions": 32,
    "resid_pdrop": 0.0,  # no dropout: ranks and the reference draw no masks, so runs compare exactly
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}


@pytest.fixture(scope="module")
def lm_shards(tmp_path_factory):
    """Generated documents through a BPE trained here, packed in 32-token blocks."""
    root = tmp_path_factory.mktemp("hf")
    (root / "docs").mkdir()
    for i, doc in enumerate(documents(24, 60)):
        (root / "docs" / f"doc{i:03d}.txt").write_text(doc)
    tokens.train_bpe(
        (p.read_text() for p in sorted((root / "docs").iterdir())), 300, root / "tok.json", say=lambda m: None
    )
    shard(str(root / "docs"), str(root / "s"), "--tokenizer", str(root / "tok.json"), "--seq-len", "32")
    return root / "s"


def gpt2_cfg(shards, run_dir=None, **updates) -> JobConfig:
    base = {
        "data.format": "shards",
        "data.path": str(shards),
        "data.batch_size": 16,
        "model.target": CAUSAL,
        "model.kwargs": {"config": GPT2},
        "optim.lr": 0.01,
        "train.max_steps": 60,
        "train.eval_every": 0,
        "log.tensorboard": False,
        **({"run.dir": str(run_dir)} if run_dir else {}),
    }
    return JobConfig().replace({**base, **updates})


def vocab(shards) -> int:
    return json.loads((Path(shards) / "manifest.json").read_text())["vocab_size"]


def test_gpt2_sized_by_the_data_trains_below_the_unigram_baseline_on_its_own_loss(lm_shards, tmp_path):
    cfg = gpt2_cfg(lm_shards, tmp_path, **{"model.output": "loss", "train.eval_every": 60})
    job = build_job(cfg, WorldInfo(), torch.device("cpu"))
    model = job.bare_model
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.vocab_size == vocab(lm_shards)
    assert not any(k.startswith(("model.", "module.")) for k in model.state_dict())  # nothing wraps it
    train_set, val_set = open_shards(DataConfig(format="shards", path=str(lm_shards)))
    unigram = _unigram_loss(train_set, val_set, vocab(lm_shards))
    val_loss = train(job, lambda r: None)["val_loss"]
    assert val_loss < unigram - 0.3, (val_loss, unigram)


def test_the_models_own_loss_equals_cross_entropy_on_its_logits(lm_shards):
    def steps(**updates) -> tuple[list[float], dict]:
        job = build_job(gpt2_cfg(lm_shards, **updates), WorldInfo(), torch.device("cpu"))
        losses = [(lambda r: r.loss_sum.item() / r.count)(train_step(job)) for _ in range(3)]
        return losses, {k: v.detach().clone() for k, v in job.bare_model.state_dict().items()}

    own, own_params = steps(**{"model.output": "loss"})
    shoal, shoal_params = steps()
    assert np.allclose(own, shoal, rtol=1e-6, atol=0), (own, shoal)
    assert_params_close(own_params, shoal_params, atol=1e-6)  # the same gradients, three steps on


@pytest.mark.parametrize("strategy", ["allreduce", "fsdp"])
def test_two_ranks_with_accumulation_equal_one_plain_step_on_the_whole_batch(lm_shards, strategy):
    # sgd: Adam would blow float noise in near-zero gradients up to full-size steps
    common = {"optim.name": "sgd", "optim.lr": 0.5, "model.output": "loss"}
    two = gpt2_cfg(lm_shards, **common, **{"strategy": strategy, "data.batch_size": 4, "train.grad_accum_steps": 2})
    ranks = spawn_ranks(gathered_steps, 2, two.to_dict(), 3)
    losses, params = plain_steps_on_the_same_batches(two, 3)
    assert_params_close(ranks[0]["params"], params, atol=2e-6)
    assert np.allclose([(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])], losses, rtol=1e-5)


def gathered_steps(cfg_dict: dict, steps: int) -> dict:
    """run_steps on a rank, the parameters whole (fsdp's shards gathered while the group is up)."""
    out = run_steps(cfg_dict, steps)
    out["params"] = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in out["params"].items()}
    return out


def plain_steps_on_the_same_batches(cfg: JobConfig, steps: int) -> tuple[list[float], dict]:
    """A plain loop in one process, Shoal's step not used: a GPT2LMHeadModel with the run's first weights, each
    step's global batch (both ranks' spans, their micro-batches) in one forward, the model's loss, one SGD step."""
    init = build_job(cfg.replace({"strategy": "allreduce"}), WorldInfo(), torch.device("cpu")).bare_model.state_dict()
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2, vocab_size=vocab(cfg.data.path)))
    model.load_state_dict(init)
    source = open_shards(cfg.data)[0]
    k, b = cfg.train.grad_accum_steps, cfg.data.batch_size
    plans = [
        list(ShardPlan(source.shard_counts, cfg.seed, True, cfg.data.shuffle_buffer, r, 2, b).batches(0, [], 0))
        for r in range(2)
    ]
    losses = []
    for step in range(steps):
        ids = np.concatenate([plan[step * k + i] for plan in plans for i in range(k)])
        x, y, _ = source.get_batch(ids)
        loss = model(input_ids=x, labels=y, shift_labels=y).loss  # y: the next tokens already
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= cfg.optim.lr * p.grad
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fsdp_shards_each_transformer_block_the_model_names(lm_shards):
    from shoal.models import blocks

    job = build_job(gpt2_cfg(lm_shards), WorldInfo(), torch.device("cpu"))
    assert [n for n, _ in blocks(job.bare_model)] == ["transformer.h.0", "transformer.h.1"]  # _no_split_modules


def test_resume_mid_run_is_bitwise_the_uninterrupted_run(lm_shards, tmp_path):
    updates = {"train.max_steps": 24, "log.every": 4, "checkpoint.every_steps": 100}
    straight, _ = run(gpt2_cfg(lm_shards, tmp_path / "a", **updates))
    stopped, _ = run(gpt2_cfg(lm_shards, tmp_path / "b", **updates), stop_after=10)
    assert stopped["status"] == "preempted" and stopped["steps"] < 24
    resumed, _ = run(gpt2_cfg(lm_shards, tmp_path / "b", **updates), resume=True)
    assert resumed["steps"] == 24 and straight["steps"] == 24
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_loads_into_gpt2_lm_head_model_with_the_same_logits(lm_shards, tmp_path):
    cfg = gpt2_cfg(lm_shards, tmp_path / "run", **{"train.max_steps": 10})
    run(cfg)
    assert shoal_cli("export", str(tmp_path / "run"), str(tmp_path / "model.pt")).returncode == 0
    proc = shoal_cli("export", str(tmp_path / "run"), str(tmp_path / "hf"), "--format", "hugging_face")
    assert proc.returncode == 0, proc.stderr
    config = transformers.GPT2Config(
        **{k: v for k, v in GPT2.items() if k != "model_type"}, vocab_size=vocab(lm_shards)
    )
    from_state = transformers.GPT2LMHeadModel(config)
    from_state.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    from_dir = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", local_files_only=True)
    job = build_job(cfg, WorldInfo(), torch.device("cpu"))
    job.bare_model.load_state_dict(final_weights(tmp_path / "run"))
    x = open_shards(cfg.data)[0].get_batch(np.arange(4))[0]
    want = job.bare_model.eval()(x)
    for model in (from_state, from_dir):
        assert torch.allclose(model.eval()(input_ids=x).logits, want, atol=1e-6)
    # and back in: the directory as a from_pretrained target starts a job from those weights, nothing downloaded
    again = gpt2_cfg(lm_shards, **{
        "model.target": "transformers:AutoModelForCausalLM.from_pretrained",
        "model.kwargs": {"pretrained_model_name_or_path": str(tmp_path / "hf")},
    })  # fmt: skip
    assert torch.allclose(build_job(again, WorldInfo(), torch.device("cpu")).bare_model.eval()(x), want, atol=1e-6)
    missing = again.replace({"model.kwargs": {"pretrained_model_name_or_path": "gpt2"}})
    with pytest.raises(ConfigError, match="'gpt2' is not a local directory"):
        build_job(missing, WorldInfo(), torch.device("cpu"))


def test_a_vocabulary_other_than_the_datas_exits_2_naming_the_key_and_both_sizes(lm_shards, tmp_path):
    job = tmp_path / "job.yaml"
    config = {**GPT2, "vocab_size": 250}
    job.write_text(
        json.dumps(
            {
                "data": {"format": "shards", "path": str(lm_shards)},
                "model": {"target": CAUSAL, "kwargs": {"config": config}},
            }
        )
    )
    proc = shoal_cli("validate", str(job))
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "model.kwargs.config.vocab_size" in line and "250" in line and str(vocab(lm_shards)) in line, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "updates, words",
    [
        ({"model.inputs": {"pixels": "input_ids"}}, ["model.inputs", "'pixels'", "input_ids, labels"]),
        ({"model.inputs": {"input_ids": "tokens"}}, ["model.inputs", "no argument 'tokens'", "input_ids"]),
        ({"model.inputs": {"input_ids": "input_ids"}, "model.output": "loss"}, ["model.output", "labels: labels"]),
    ],
)
def test_inputs_that_do_not_fit_the_batch_or_the_forward_are_named(lm_shards, updates, words):
    with pytest.raises(ConfigError) as e:
        build_job(gpt2_cfg(lm_shards, **updates), WorldInfo(), torch.device("cpu"))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_an_output_the_model_does_not_return_is_named_with_what_it_returned(lm_shards):
    job = build_job(gpt2_cfg(lm_shards, **{"model.output": "hidden_states"}), WorldInfo(), torch.device("cpu"))
    with pytest.raises(ConfigError) as e:
        train_step(job)
    assert "model.output" in str(e.value) and "CausalLMOutputWithCrossAttentions" in str(e.value)
    assert "keys: logits" in str(e.value)


def test_activation_checkpointing_of_its_blocks_gives_the_same_steps(lm_shards):
    def steps(**updates) -> dict:
        job = build_job(gpt2_cfg(lm_shards, **updates), WorldInfo(), torch.device("cpu"))
        for _ in range(2):
            train_step(job)
        return {k: v.detach().clone() for k, v in job.bare_model.state_dict().items()}

    assert_params_close(steps(**{"train.activation_checkpointing": "full"}), steps(), atol=1e-6)


def test_check_probes_it_on_the_batch_it_trains_on_and_compress_prunes_its_conv1d(lm_shards, tmp_path):
    from shoal import check
    from shoal.compress.prune import layers, prune

    cfg = gpt2_cfg(lm_shards, tmp_path, **{"model.output": "loss"})
    result = check.run(cfg, tmp_path / "check", say=lambda m: None)
    # the first batch, its gradients and the overfitting probe ran on the model's own loss: no model finding
    assert not [f for f in result.findings if f.area == "model"], result.findings
    model = build_job(cfg, WorldInfo(), torch.device("cpu")).bare_model
    pruned = {n for n, _ in layers(model)}
    assert "transformer.h.0.attn.c_attn" in pruned and "lm_head" not in pruned  # tied to wte: spared
    prune(model, 0.5, method="structured")
    w = model.transformer.h[0].mlp.c_fc.weight  # (inputs, outputs)
    assert (w.abs().sum(dim=0) == 0).float().mean() == pytest.approx(0.5, abs=0.01)  # whole output columns


def test_timm_models_get_the_datas_channels_and_classes_and_never_pretrained_weights(tmp_path):
    from shoal import hf
    from shoal.data.spec import DataSpec

    spec = DataSpec(task="classification", input_shape=(1, 8, 8), num_classes=10)
    assert hf.timm_kwargs({"model_name": "resnet10t"}, spec) == {
        "model_name": "resnet10t", "in_chans": 1, "num_classes": 10, "pretrained": False,
    }  # fmt: skip
    assert hf.timm_kwargs({"model_name": "m", "num_classes": 7}, spec)["num_classes"] == 7  # given: kept
    cfg = JobConfig().replace({
        "data.dataset": "digits", "model.target": "timm:create_model",
        "model.kwargs": {"model_name": "resnet10t", "pretrained": True}, "run.dir": str(tmp_path),
    })  # fmt: skip
    with pytest.raises(ConfigError, match="model.kwargs.pretrained: true would download weights"):
        build_job(cfg, WorldInfo(), torch.device("cpu"))


ANIMALS = ("cat", "dog", "fox", "bird", "horse")
BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """A parquet text-classification set: one to three generated sentences per row (so lengths vary), labelled
    "animal" when a sentence's subject is an animal, else "thing"; BPE ids right-padded to 64."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_tokens import sentence

    rng = random.Random(1)
    texts = [" ".join(sentence(rng) for _ in range(rng.randint(1, 3))) for _ in range(700)]
    labels = [
        "animal" if t.split()[1].strip(".").lower() in ANIMALS or t.split()[2] in ANIMALS else "thing" for t in texts
    ]
    root = tmp_path_factory.mktemp("reviews")
    pq.write_table(pa.table({"text": texts, "label": labels}), root / "r.parquet")
    tokens.train_bpe(iter(texts), 300, root / "tok.json", say=lambda m: None)
    shard(str(root / "r.parquet"), str(root / "s"), "--tokenizer", str(root / "tok.json"), "--label-column", "label",
          "--seq-len", "64")  # fmt: skip
    return root / "s"


def bert_cfg(shards, run_dir=None, **updates) -> JobConfig:
    return gpt2_cfg(shards, run_dir, **{
        "model.target": "transformers:AutoModelForSequenceClassification.from_config",
        "model.kwargs": {"config": BERT}, "optim.lr": 0.003, "data.batch_size": 32, **updates,
    })  # fmt: skip


def test_a_bert_classifier_trains_on_padded_variable_length_texts_above_the_majority_class(reviews, tmp_path):
    manifest = json.loads((reviews / "manifest.json").read_text())
    job = build_job(bert_cfg(reviews, tmp_path, **{"train.max_steps": 80, "train.eval_every": 80}), WorldInfo(),
                    torch.device("cpu"))  # fmt: skip
    assert job.bare_model.config.num_labels == 2 and job.bare_model.config.vocab_size == manifest["vocab_size"]
    x, _ = next(job.data.train)
    mask = x["attention_mask"]
    assert x["input_ids"].shape[1] == int(mask.sum(1).max()) < 64  # cut to the batch's longest sample
    assert torch.equal(mask.bool(), x["input_ids"] != manifest["pad_id"])
    val = open_shards(DataConfig(format="shards", path=str(reviews)))[1]
    labels = val.get_batch(np.arange(len(val)))[1]
    majority = float(torch.bincount(labels).max()) / len(labels)
    records = []
    summary = train(job, records.append)
    assert summary["val_accuracy"] > majority + 0.1, (summary["val_accuracy"], majority)
    assert all(0 < r["tokens_per_s"] < 64 * r["samples_per_s"] for r in records if "tokens_per_s" in r)


def test_one_long_and_one_short_sample_give_each_the_loss_it_has_alone(reviews):
    job = build_job(bert_cfg(reviews), WorldInfo(), torch.device("cpu"))
    model = job.bare_model.eval()
    source = open_shards(DataConfig(format="shards", path=str(reviews)))[0]
    from shoal.data.fields import FieldsSource

    fields = FieldsSource(source)
    lengths = (source.get_batch(np.arange(64))[0] != source.spec.pad_id).sum(1)
    long, short = int(lengths.argmax()), int(lengths.argmin())
    assert lengths[long] > 2 * lengths[short]

    def losses(ids: list[int]) -> torch.Tensor:
        x, y, _ = fields.get_batch(np.array(ids))
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(x), y, reduction="none")

    together = losses([long, short])
    assert torch.allclose(together, torch.cat([losses([long]), losses([short])]), atol=1e-5), together


def test_label_smoothing_with_the_models_own_loss_is_refused_naming_the_key():
    from shoal.config import load_config

    with pytest.raises(ConfigError, match="train.label_smoothing: applies to train.loss"):
        load_config(None, [f"model.target={CAUSAL}", "model.output=loss", "train.label_smoothing=0.1"])


def test_a_class_count_other_than_the_datas_is_named_with_both(reviews):
    cfg = bert_cfg(reviews, **{"model.kwargs": {"config": {**BERT, "num_labels": 5}}})
    with pytest.raises(ConfigError) as e:
        build_job(cfg, WorldInfo(), torch.device("cpu"))
    assert e.value.key == "model.kwargs.config.num_labels" and "has 5 but the data's 2 classes" in str(e.value)


def test_its_tied_embedding_is_one_parameter_and_norms_and_biases_are_not_decayed(lm_shards):
    job = build_job(gpt2_cfg(lm_shards, **{"optim.weight_decay": 0.1}), WorldInfo(), torch.device("cpu"))
    model = job.bare_model
    assert model.lm_head.weight is model.transformer.wte.weight
    names = {id(p): n for n, p in model.named_parameters()}  # each tensor once, under its first name
    decayed, kept = ({names[id(p)] for p in g["params"]} for g in job.optimizer.param_groups)
    assert job.optimizer.param_groups[0]["weight_decay"] == 0.1 and job.optimizer.param_groups[1]["weight_decay"] == 0
    assert "transformer.wte.weight" in decayed and "lm_head.weight" not in decayed | kept
    assert {n for n in names.values() if ".ln_" in n or n.endswith(".bias")} == kept

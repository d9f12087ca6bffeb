"""cmgems.hf: the masking as a transformers data collator and the curriculum as a TrainerCallback,
with a real Trainer run of a tiny model on the test genome that switches stage and logs the switch
to the Trainer's MLflow run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from cmgems.hf import CurriculumCallback, MaskingCollator, ShardDataset
from cmgems.masking.maskings import IGNORE_INDEX, mask_batch
from cmgems.data.npmi_table import load_table, npmi_of_ids
from cmgems.rng import generator
from cmgems.data.shards import ShardSet
from cmgems.model.tokenizer import DNAKmerTokenizer
from cmgems.data.tokens import CLS_ID, PAD_ID, SEP_ID, vocab_size


def features(dataset, n: int, start: int = 0) -> list[dict]:
    return [dataset[i] for i in range(start, start + n)]


def expected(collator, feats, strategy, batch_index, worker=0):
    """What cmgems.masking.maskings itself gives this batch with the collator's generator."""
    ids = torch.nn.utils.rnn.pad_sequence([torch.as_tensor(f["input_ids"]) for f in feats],
                                          batch_first=True, padding_value=PAD_ID)
    attention = (ids != PAD_ID).long()
    gen = generator(collator.seed, batch_index, worker, "hf-mask")
    inputs, labels, _ = mask_batch(ids, npmi_of_ids(collator.table, ids), attention, strategy,
                                   collator.vocab_size, gen, k=collator.k,
                                   probabilities=collator.probabilities)
    return inputs, labels


def test_shard_features_and_npmi_are_the_shards(tiny_dataset):
    data = ShardDataset(tiny_dataset, "train", max_length=64)
    shards = ShardSet(tiny_dataset, "train")
    collator = MaskingCollator.for_dataset(tiny_dataset)
    for i in (0, 5, len(data) - 1):
        ids = data[i]["input_ids"]
        tokens, npmi = shards[i]
        assert ids[0] == CLS_ID and ids[-1] == SEP_ID and len(ids) <= 64
        assert np.array_equal(ids[1:-1], tokens[:62])
        looked_up = npmi_of_ids(collator.table, torch.as_tensor(ids[1:-1])).numpy()
        np.testing.assert_allclose(looked_up, npmi[:62].astype(np.float32), atol=1e-3)


def test_collator_masks_with_cmgems_masking_and_follows_the_stage(tiny_dataset):
    data = ShardDataset(tiny_dataset, "train", max_length=64)
    collator = MaskingCollator.for_dataset(tiny_dataset, mode="cm_gems", seed=3)
    first, second = features(data, 4), features(data, 4, start=4)
    batch = collator(first)
    want_inputs, want_labels = expected(collator, first, "genemask", 0)
    assert torch.equal(batch["input_ids"], want_inputs)
    assert torch.equal(batch["labels"], want_labels)
    assert (batch["labels"] != IGNORE_INDEX).any()
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    specials = batch["input_ids"] <= SEP_ID  # [CLS] [SEP] [PAD] are never predicted
    assert (batch["labels"][specials & (want_labels == IGNORE_INDEX)] == IGNORE_INDEX).all()
    collator.set_stage(1)
    batch = collator(second)
    assert torch.equal(batch["labels"], expected(collator, second, "global", 1)[1])


def test_cm_step_and_fixed_modes(tiny_dataset):
    data = ShardDataset(tiny_dataset, "train", max_length=64)
    fixed = MaskingCollator.for_dataset(tiny_dataset, mode="fixed:random")
    assert torch.equal(fixed(features(data, 4))["labels"],
                       expected(fixed, features(data, 4), "random", 0)[1])
    step = MaskingCollator.for_dataset(tiny_dataset, mode="cm_step")
    step.set_step(99, max_steps=100)  # the last block: global with probability 0.99
    gen = generator(0, 0, 0, "x")
    assert step.strategies(200, gen).count("global") > 180


def test_raw_sequences_with_the_tokenizer_and_a_table(tiny_dataset):
    table = load_table(tiny_dataset / "npmi.tsv", 6)
    collator = MaskingCollator(table, mode="fixed:global")
    tok = DNAKmerTokenizer(k=6)
    seqs = ["ACGTTGCAAGGCTTANNACGTTAGCAGGATCCAAT" * 3, "ttgacagctagctcagtcctaggtataatgct"]
    feats = [tok(s) for s in seqs]
    batch = collator(feats)
    assert batch["input_ids"].shape == (2, len(seqs[0]) - 5 + 2)
    assert torch.equal(batch["labels"], expected(collator, feats, "global", 0)[1])


def test_frozen_evaluation_set(tiny_dataset):
    valid = ShardDataset(tiny_dataset, "valid", max_length=64)
    collator = MaskingCollator.for_dataset(tiny_dataset, mode="cm_gems")
    a, b = collator.frozen(valid, batch_size=5), collator.frozen(valid, batch_size=5)
    assert len(a) == len(valid)
    assert all(torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))
    assert all(len(x["input_ids"]) == len(valid[i]["input_ids"]) for i, x in enumerate(a))
    assert sum(int((x["labels"] != IGNORE_INDEX).sum()) for x in a) > 0
    padded = collator(a[:3])  # features with labels are padded, not masked again
    assert torch.equal(padded["labels"][0, :len(a[0]["labels"])], a[0]["labels"])


def test_stage_reaches_dataloader_workers(tiny_dataset):
    """The callback sets the stage in the training process; workers' copies of the collator see
    it at the next batch they collate (after the prefetched ones)."""
    data = ShardDataset(tiny_dataset, "train", max_length=64)
    collator = MaskingCollator.for_dataset(tiny_dataset, mode="cm_gems")
    loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=1, prefetch_factor=1,
                                         collate_fn=collator)
    used = []
    for b, batch in enumerate(loader):
        feats = features(data, 4, start=4 * b)
        for strategy in ("genemask", "global"):
            if torch.equal(batch["labels"], expected(collator, feats, strategy, b)[1]):
                used.append(strategy)
        if b == 2:
            collator.set_stage(1)
        if b == 8:
            break
    assert used[:3] == ["genemask"] * 3 and used[-4:] == ["global"] * 4
    assert len(used) == 9  # every batch matched exactly one strategy


class RecordingCollator(MaskingCollator):
    """The real collator, also noting which masking each batch got (under cm_gems every sample
    of a batch gets the same)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.used = []

    def strategies(self, batch, gen):
        s = super().strategies(batch, gen)
        assert len(s) == batch and len(set(s)) == 1, s
        self.used.append(s[0])
        return s


@pytest.mark.slow
def test_trainer_switches_stage_and_logs_it_to_mlflow(tiny_dataset, tmp_path, monkeypatch):
    from transformers import BertConfig, BertForMaskedLM, Trainer, TrainingArguments
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the experiment MLflowCallback makes keeps artifacts in ./mlruns
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hf-trainer")
    collator = RecordingCollator.for_dataset(tiny_dataset, mode="cm_gems", seed=0)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=vocab_size(6), hidden_size=32,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=64,
                                       pad_token_id=PAD_ID))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=12,
                             per_device_train_batch_size=4, per_device_eval_batch_size=8,
                             eval_strategy="steps", eval_steps=3, logging_steps=3,
                             learning_rate=1e-3, save_strategy="no", report_to=["mlflow"],
                             use_cpu=True, dataloader_num_workers=0, seed=0,
                             disable_tqdm=True)
    callback = CurriculumCallback(collator, threshold=1e9)  # switch at the second evaluation
    trainer = Trainer(model=model, args=args, data_collator=collator, callbacks=[callback],
                      train_dataset=ShardDataset(tiny_dataset, "train", 64),
                      eval_dataset=collator.frozen(ShardDataset(tiny_dataset, "valid", 64)))
    import logging
    from transformers.utils import logging as hf_logging

    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.seen = []

        def emit(self, record):
            self.seen.append(record)

    shown = Records()  # beside the handler transformers writes to stderr with
    hf_logging.get_logger().addHandler(shown)
    try:
        trainer.train()
    finally:
        hf_logging.get_logger().removeHandler(shown)
    # the switch reaches transformers' own handler at a level its default verbosity shows
    (switch,) = [r for r in shown.seen if r.getMessage().startswith("curriculum: ")]
    assert switch.getMessage().startswith("curriculum: genemask -> global at step 6")
    assert switch.levelno >= hf_logging.get_verbosity()
    assert [e["step"] for e in callback.events] == [6]
    assert collator.stage_index == 1
    # batches 0..5 trained steps 1..6; batch 6 was collated before the evaluation at step 6
    # (accelerate looks one batch ahead), so the switch shows from batch 7 on
    assert collator.used[:7] == ["genemask"] * 7
    assert set(collator.used[7:12]) == {"global"}
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("hf-trainer").experiment_id])
    assert run.data.tags["curriculum.switch_step"] == "6"
    assert run.data.tags["curriculum.stage"] == "global"
    stage = {m.step: m.value for m in client.get_metric_history(run.info.run_id,
                                                                 "curriculum/stage")}
    assert stage == {3: 0, 6: 1, 9: 1, 12: 1}
    assert len(client.get_metric_history(run.info.run_id, "eval/ppl")) == 4
    events = json.loads(open(client.download_artifacts(run.info.run_id, "curriculum_events.json",
                                                       str(tmp_path))).read())
    assert events[0]["from"] == "genemask" and events[0]["to"] == "global"


def test_cm_gems_without_evaluation_is_refused(tiny_dataset, tmp_path):
    from transformers import BertConfig, BertForMaskedLM, Trainer, TrainingArguments

    from cmgems.errors import InputError
    collator = MaskingCollator.for_dataset(tiny_dataset)
    model = BertForMaskedLM(BertConfig(vocab_size=vocab_size(6), hidden_size=16,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, max_position_embeddings=64))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True,
                             save_strategy="no")
    trainer = Trainer(model=model, args=args, data_collator=collator,
                      train_dataset=ShardDataset(tiny_dataset, "train", 64),
                      callbacks=[CurriculumCallback(collator)])
    with pytest.raises(InputError, match="eval_strategy"):
        trainer.train()

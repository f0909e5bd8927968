"""Token-budget batches (tuneline/training/batching.py): every example once per epoch, no batch over budget."""

from tuneline.training.batching import TokenBudgetBatches, example_lengths

LENGTHS = [5, 300, 40, 17, 999, 64, 8, 120, 33, 260, 71, 2]


def test_each_epoch_holds_every_example_once_and_no_batch_over_budget():
    batches = TokenBudgetBatches(LENGTHS, budget=300, seed=7)
    for epoch in range(3):
        batches.set_epoch(epoch)
        seen = [i for batch in batches for i in batch]
        assert sorted(seen) == list(range(len(LENGTHS)))
        assert len(list(batches)) == len(batches)
        for batch in batches:
            assert sum(LENGTHS[i] for i in batch) <= 300 or len(batch) == 1  # 999 tokens: a batch of its own
        assert [999] in [[LENGTHS[i] for i in b] for b in batches]


def test_batches_repeat_for_the_same_seed_and_epoch_and_change_between_epochs():
    first, again = TokenBudgetBatches(LENGTHS, 300, seed=7), TokenBudgetBatches(LENGTHS, 300, seed=7)
    assert list(first) == list(again)  # a resumed run skips exactly the batches it already trained on
    first.set_epoch(1)
    assert list(first) != list(again)


def test_lengths_come_from_rows_or_a_dataset():
    from datasets import Dataset

    rows = [{"input_ids": [1] * n} for n in (3, 1, 4)]
    assert example_lengths(rows) == example_lengths(Dataset.from_list(rows)) == [3, 1, 4]

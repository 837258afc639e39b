import torch

from collie.data.loader import BatchStream


def collate(samples):
    return torch.tensor(samples)


def take(stream, n):
    return [next(stream).tolist() for _ in range(n)]


def test_epochs_cover_the_data_once_in_seeded_order():
    data = list(range(10))
    stream = BatchStream(data, 3, collate, seed=1)
    first_epoch = sum(take(stream, 3), [])
    assert len(set(first_epoch)) == 9  # the ragged tail (1 sample) is dropped
    assert take(BatchStream(data, 3, collate, seed=1), 3) == [first_epoch[i:i + 3] for i in (0, 3, 6)]
    assert take(BatchStream(data, 3, collate, seed=2), 3) != [first_epoch[i:i + 3] for i in (0, 3, 6)]


def test_resume_neither_repeats_nor_skips():
    data = list(range(20))
    whole = take(BatchStream(data, 4, collate, seed=0), 12)
    first = BatchStream(data, 4, collate, seed=0)
    head = take(first, 7)
    resumed = BatchStream(data, 4, collate, seed=0)
    resumed.load_state_dict(first.state_dict())
    assert head + take(resumed, 5) == whole


def test_data_parallel_ranks_split_each_global_batch():
    data = list(range(16))
    single = take(BatchStream(data, 4, collate, seed=0), 4)
    ranks = [take(BatchStream(data, 2, collate, seed=0, dp_rank=r, dp_size=2), 4) for r in range(2)]
    for step in range(4):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(single[step])


def test_resume_at_another_data_parallel_degree_and_across_epochs():
    data = list(range(10))  # global batch 4: two batches per epoch, 2 samples dropped per epoch
    whole = [sorted(batch) for batch in take(BatchStream(data, 4, collate, seed=3), 5)]
    ranks = [BatchStream(data, 2, collate, seed=3, dp_rank=r, dp_size=2) for r in range(2)]
    head = [sorted(a + b) for a, b in zip(take(ranks[0], 3), take(ranks[1], 3))]  # into the second epoch
    assert ranks[0].state_dict() == ranks[1].state_dict() == {"epoch": 1, "samples_taken": 4, "seed": 3}
    resumed = BatchStream(data, 4, collate, seed=0)
    resumed.load_state_dict(ranks[0].state_dict())  # one process continues where two ranks stopped
    assert head + [sorted(batch) for batch in take(resumed, 2)] == whole

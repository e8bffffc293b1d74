"""The k-fold split (nnunet_plugins.training.crossval.kfold_split): official KiPA22 protocol of BA-Net
(``KFold(4, shuffle=True, random_state=12345)``), equal to sklearn's and nnU-Net's."""
import numpy as np
import pytest

from nnunet_plugins.training.crossval import kfold_split


def test_kfold_hand_checked_folds():
    # np.random.RandomState(12345).permutation(10) == [0 7 3 9 6 4 1 8 5 2]; fold sizes 3, 3, 2, 2 taken in
    # that order and sorted: {0,3,7}, {4,6,9}, {1,8}, {2,5}
    assert list(np.random.RandomState(12345).permutation(10)) == [0, 7, 3, 9, 6, 4, 1, 8, 5, 2]
    ids = [f"case_{i:05d}" for i in range(10)]
    splits = kfold_split(ids, 4, 12345)
    assert [s["val"] for s in splits] == [[ids[i] for i in fold] for fold in ([0, 3, 7], [4, 6, 9], [1, 8], [2, 5])]
    for s in splits:
        assert s["train"] == [i for i in ids if i not in s["val"]]


@pytest.mark.parametrize("n", [4, 7, 10, 23, 70, 71])
def test_kfold_equals_an_independent_numpy_computation(n):
    ids = [f"c{i:03d}" for i in range(n)]
    folds = np.array_split(np.random.RandomState(12345).permutation(n), 4)  # sizes: first n % 4 get one more
    expected = [sorted(ids[i] for i in fold) for fold in folds]
    splits = kfold_split(ids, 4)
    assert [s["val"] for s in splits] == expected
    assert sorted(sum((s["val"] for s in splits), [])) == ids  # every case validated exactly once


def test_kfold_equals_sklearn_and_nnunet():
    model_selection = pytest.importorskip("sklearn.model_selection")
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    for n_splits in (4, 5):
        for n in range(n_splits, 75, 7):
            ids = [f"case_{i:05d}" for i in range(n)]
            expected = [{"train": [ids[i] for i in tr], "val": [ids[i] for i in te]}
                        for tr, te in model_selection.KFold(n_splits, shuffle=True, random_state=12345).split(ids)]
            assert kfold_split(ids, n_splits, 12345) == expected
            assert kfold_split(ids, n_splits, 12345) == generate_crossval_split(ids, 12345, n_splits)


def test_kfold_rejects_bad_input():
    with pytest.raises(ValueError, match="3 cases"):
        kfold_split(["a", "b", "c"], 4)
    with pytest.raises(ValueError, match="unique"):
        kfold_split(["a", "a", "b", "c"], 2)

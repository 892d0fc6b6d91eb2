"""The suite's task roles and its held-out tasks: fixed, deterministic, balanced and labelled by their pictures."""

from __future__ import annotations

import numpy as np
import pytest

from adaptor_peft.data.synthetic import TASKS, generate, task_roles
from adaptor_peft.training import load_recipe, recipes_dir

HELD_OUT = ("objects", "retina", "elevation", "vehicles")


def test_the_ablation_tasks_are_design_and_four_new_ones_are_held_out_in_every_group():
    roles = task_roles()
    assert roles["design"] == ("digits", "landcover", "count", "distance")
    assert roles["held-out"] == HELD_OUT
    assert {TASKS[t].group for t in roles["held-out"]} == {"natural", "specialized", "structured"}
    assert sorted(t for names in roles.values() for t in names) == sorted(TASKS)  # every task has one role
    for task in HELD_OUT:
        assert load_recipe(f"offline_vtab/{task}")["data"]["builtin"]["task"] == task
        assert "# Held out" in (recipes_dir() / "offline_vtab" / f"{task}.yaml").read_text()


def test_a_new_task_changes_no_earlier_tasks_images():
    """Streams are numbered by a fixed list, not by table order: these pixels were drawn before the new tasks."""
    images, labels = generate("count", "train800", 4)
    assert labels.tolist() == [2, 5, 2, 1] and int(images.astype(np.int64).sum()) == 668_055


@pytest.mark.parametrize("task", HELD_OUT)
def test_held_out_tasks_are_deterministic_in_range_and_balanced(task):
    images, labels = generate(task, "test", 600, seed=3)
    classes = TASKS[task].num_classes
    assert images.shape == (600, 32, 32, 3) and images.dtype == np.uint8 and images.std() > 20
    assert labels.min() == 0 and labels.max() == classes - 1
    assert np.bincount(labels, minlength=classes).min() > 0.6 * 600 / classes
    generate.cache_clear()
    again, same = generate(task, "test", 600, seed=3)
    assert np.array_equal(again, images) and np.array_equal(same, labels)
    assert not np.array_equal(generate(task, "test", 600, seed=4)[0], images)  # each data seed draws anew
    assert not np.array_equal(generate(task, "val200", 600, seed=3)[0], images)


def test_held_out_labels_follow_the_pictures():
    """Retina: more dark-red lesion pixels (not the lighter vessels) at a higher grade."""
    images, labels = generate("retina", "train800", 300)
    red, green = images[..., 0].astype(np.int64), images[..., 1].astype(np.int64)
    lesions = ((red > 60) & (red < 105) & (green < 20)).sum(axis=(1, 2))
    assert np.corrcoef(lesions, labels)[0, 1] > 0.5
    assert all(lesions[labels == g].mean() < lesions[labels == g + 1].mean() for g in range(4))

"""Smoke tests: each recipe runs a few steps end to end on the tiny model and its key metric
moves the right way. They run the recipes' own main() with small arguments."""

import pytest

from tests.learning import holds
from tests.scripted import load_recipe as recipe



@pytest.mark.slow
@pytest.mark.learning
def test_sft_chat_nll_falls(tmp_path, learning_seed):
    m = recipe("sft_chat")(["--steps", "15", "--batch-size", "8", "--eval-every", "5", "--seed", str(learning_seed),
                            "--checkpoint-dir", str(tmp_path)])
    holds(m["nll_after"] / m["nll_before"], "<", 0.6, "held-out NLL after 15 SFT steps / before")


@pytest.mark.slow
@pytest.mark.learning
def test_dpo_prefers_chosen(tmp_path, learning_seed):
    m = recipe("dpo")(["--steps", "20", "--pairs-per-batch", "8", "--eval-every", "10", "--seed", str(learning_seed),
                       "--checkpoint-dir", str(tmp_path)])
    assert m["margin_before"] == pytest.approx(0.0, abs=1e-4)  # the reference is the step-0 policy
    holds(m["margin_after"], ">", 0.1, "DPO margin after 20 steps")
    holds(m["accuracy_after"] - m["accuracy_before"], ">", 0.1, "held-out preference accuracy gain")


@pytest.mark.slow
@pytest.mark.learning
def test_rlhf_reward_model_and_policy_reward_rise(tmp_path, learning_seed):
    """The reward model learns the preferences (held-out pairwise accuracy, 64 pairs, rose by
    0.11-0.22 over seeds 0-3 with 60 steps; 0.02-0.22 with 20). The RL stage runs and is scored,
    but its reward gain is not asserted: over seeds 0-3 and 24 RL steps it was +0.00 to +0.19
    (8 steps: -0.01 to +0.08), too weak on the tiny model to hold on every seed and machine."""
    m = recipe("rlhf")(["--sft-steps", "20", "--rm-steps", "60", "--rl-steps", "8", "--batch-size", "16",
                        "--seed", str(learning_seed), "--checkpoint-dir", str(tmp_path)])
    holds(m["rm_accuracy_after"] - m["rm_accuracy_before"], ">", 0.0, "reward-model accuracy gain")
    assert 0.0 < m["reward_before"] < 1.0 and 0.0 < m["reward_after"] < 1.0  # exp(mean logprob) of real answers
    assert 0.0 <= m["correct_after"] <= 1.0


@pytest.mark.slow
@pytest.mark.learning
def test_prompt_distillation_student_takes_on_the_prompt(tmp_path, learning_seed):
    """The student (no system prompt) takes on the prompted teacher's answers: its NLL of them
    falls, and the share of its sampled answers in the prompt's equation form rises from 0 (to
    0.29-0.84 over seeds 0-3). Its greedy form is not asserted: the tiny model answers every
    question in one form greedily, so that rate is all or nothing, and with 10 steps one seed
    in four stayed at 0."""
    m = recipe("prompt_distillation")(["--prompt-sft-steps", "25", "--steps", "20", "--questions", "64",
                                       "--batch-size", "16", "--seed", str(learning_seed),
                                       "--checkpoint-dir", str(tmp_path)])
    holds(m["form_teacher"], ">", 0.8, "stage 0: the prompted teacher's equation-form rate")
    holds(m["nll_after"] / m["nll_before"], "<", 0.5, "student NLL of the teacher's answers after / before")
    holds(m["sampled_form_after"] - m["sampled_form_before"], ">", 0.1, "student sampled equation-form rate gain")


@pytest.mark.slow
def test_sft_chat_seed_gives_independent_runs_and_repeats_exactly(tmp_path):
    """--seed offsets every seed a recipe uses (0 is the documented run): the same seed gives
    the same losses in one process, another seed other data, batches and LoRA init."""
    def run(seed: int) -> dict[str, float]:
        return recipe("sft_chat")(["--steps", "3", "--batch-size", "4", "--eval-every", "3", "--seed", str(seed),
                                   "--checkpoint-dir", str(tmp_path / f"seed{seed}")])

    first, again, other = run(0), run(0), run(1)
    assert again == first
    assert other["nll_before"] != first["nll_before"] and other["nll_after"] != first["nll_after"]

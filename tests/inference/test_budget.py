"""Fair prefill budget learned from step timings of a simulated machine."""
from services.inference.core.budget import PrefillBudget


def simulated_step_ms(num_decode: int, num_prefill: int) -> float:
    # Shaped after measurements on 2-core CPUs: 4 streams ~44 ms, each prompt token ~4.5 ms.
    return 11.0 * num_decode + (20.0 + 4.5 * num_prefill if num_prefill else 0.0)


def run_steps(budget: PrefillBudget, num_decode: int, steps: int) -> list[int]:
    chosen = []
    for _ in range(steps):
        n = budget.tokens_for_step(num_decode)
        chosen.append(n)
        budget.observe(num_decode, n, simulated_step_ms(num_decode, n))
    return chosen


def test_nothing_decoding_gets_the_whole_batch():
    assert PrefillBudget(max_tokens=512).tokens_for_step(0) == 512


def test_first_step_with_streams_measures_pure_decode():
    assert PrefillBudget().tokens_for_step(4) == 0


def test_budget_converges_to_the_largest_chunk_within_the_slowdown():
    budget = PrefillBudget(slowdown=2.0, min_tokens=1)
    chosen = run_steps(budget, 4, 40)
    settled = chosen[-10:]
    # 44 ms base, 88 ms allowed: 20 + 4.5 n <= 44  ->  n <= 5, so 4 on the ladder.
    assert set(settled) <= {0, 4}
    assert 4 in settled
    for n in settled:
        if n:
            assert simulated_step_ms(4, n) <= 2.0 * simulated_step_ms(4, 0)


def test_absolute_target_overrides_slowdown():
    budget = PrefillBudget(itl_target_ms=200.0, min_tokens=1)
    chosen = run_steps(budget, 4, 60)
    # 200 - 44 = 156 ms of prefill: 20 + 4.5 n <= 156 -> n <= 30, so 16 on the ladder.
    assert max(chosen[-10:]) == 16


def test_budget_backs_off_when_steps_get_slower():
    budget = PrefillBudget(slowdown=3.0, min_tokens=1)
    run_steps(budget, 4, 40)
    high = budget.tokens_for_step(4)
    for _ in range(30):
        n = budget.tokens_for_step(4)
        budget.observe(4, n, simulated_step_ms(4, n) + 6.0 * n)  # the machine got busier
    assert budget.tokens_for_step(4) < high


def test_minimum_keeps_a_long_prompt_moving_when_nothing_fits():
    budget = PrefillBudget(slowdown=1.01, min_tokens=4)
    chosen = run_steps(budget, 4, 20)
    assert min(chosen[1:]) >= 4

"""The agreement rule for greedy outputs of two engine configurations.

Identical tokens, or - where batched matrix products round differently - the first diverging token
is within the other run's top-2 at that position and the two runs' logprobs there differ by at most
LOGPROB_TOL.
"""
LOGPROB_TOL = 0.05


def assert_greedy_agree(a, b, tol: float = LOGPROB_TOL) -> None:
    """a, b: finished RequestOutputs of the same prompt, generated with logprobs >= 2."""
    ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
    if ta == tb:
        return
    n = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
    assert n < min(len(ta), len(tb)), f"one run stopped early: {ta} vs {tb}"
    la, lb = a.outputs[0].logprobs[n], b.outputs[0].logprobs[n]
    top2_b = [t for t, _ in lb.top[:2]]
    top2_a = [t for t, _ in la.top[:2]]
    assert ta[n] in top2_b and tb[n] in top2_a, f"diverged at {n}: {ta[n]} vs {tb[n]}, not a near-tie"
    da = dict(la.top)
    db = dict(lb.top)
    for tok in set(top2_a) & set(top2_b):
        assert abs(da[tok] - db[tok]) <= tol, f"logprobs differ at {n}: {da[tok]} vs {db[tok]}"

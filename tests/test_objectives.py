"""The objectives seam: combiner weights, schedules, sampling, metric names, state, the EMA
teacher's selections and prepare_batch."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax.objectives import (Combiner, EmaTeacher, FnObjective, Objective, Term, parse_terms,
                                select_params, weight_schedule)


def _const(name, value):
    """Objective whose loss is value * params['w'] (so gradients show the weight)."""
    return FnObjective(name, lambda inp: (value * inp.params["w"], {"v": jnp.float32(value)}))


class Counter(Objective):
    """Stateful: counts its calls; loss = params['w'] * 0 + count."""

    name = "count"

    def init_state(self, params):
        return {"n": jnp.zeros((), jnp.int32)}

    def __call__(self, inp):
        n = inp.state["n"] + 1
        return n.astype(jnp.float32) + 0 * inp.params["w"], {"n": n}, {"n": n}


def test_weight_schedule_step_and_ramp():
    steps = jnp.arange(8)
    np.testing.assert_array_equal(jax.vmap(lambda s: weight_schedule(s, 2.0, 3))(steps),
                                  [0, 0, 0, 2, 2, 2, 2, 2])
    np.testing.assert_allclose(jax.vmap(lambda s: weight_schedule(s, 1.0, 2, 4))(steps),
                               [0, 0, 0, 0.25, 0.5, 0.75, 1, 1], rtol=1e-6)


def test_sum_weights_names_and_gradient():
    comb = Combiner([Term(_const("a", 1.0), weight=0.5), Term(_const("b", 3.0), weight=2.0),
                     Term(_const("c", 5.0), start_step=10)])
    params = {"w": jnp.float32(1.0)}

    def f(p, step):
        return comb(p, {}, {}, jax.random.key(0), step)[:2]

    (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(params, jnp.int32(3))
    np.testing.assert_allclose(loss, 0.5 * 1 + 2 * 3, rtol=1e-6)
    np.testing.assert_allclose(grads["w"], 6.5, rtol=1e-6)
    assert float(metrics["loss/c"]) == 5.0 and float(metrics["weight/c"]) == 0.0
    assert set(metrics) == {"a/v", "b/v", "c/v", "loss/a", "loss/b", "loss/c", "weight/c"}
    loss_late, _ = f(params, jnp.int32(10))
    np.testing.assert_allclose(loss_late, 6.5 + 5.0, rtol=1e-6)


def test_state_is_threaded_per_objective():
    comb = Combiner([Term(Counter()), Term(_const("a", 1.0))])
    params = {"w": jnp.float32(1.0)}
    state = comb.init_state(params)
    for _ in range(3):
        _, metrics, state = comb(params, {}, {}, jax.random.key(0), 0, state)
    assert int(state["count"]["n"]) == 3 and int(metrics["count/n"]) == 3
    assert state["a"] == {}


def test_sampling_runs_one_task_with_its_riders_and_frequencies_follow_ratios():
    terms = [Term(_const("itm", 1.0)), Term(_const("wpa", 10.0), weight=0.1, task="itm"),
             Term(_const("mlm", 100.0))]
    comb = Combiner(terms, mixing="sample", task_ratios={"itm": 3.0, "mlm": 1.0})
    assert comb.tasks == ("itm", "mlm")
    params = {"w": jnp.float32(1.0)}
    run = jax.jit(lambda k: comb(params, {}, {}, k, 0)[:2])
    losses, ids = [], []
    for i in range(400):
        loss, metrics = run(jax.random.key(i))
        losses.append(float(loss))
        ids.append(int(metrics["task_id"]))
        if ids[-1] == 1:   # mlm ran: itm's metrics are zero-filled
            assert float(metrics["loss/itm"]) == 0.0 and float(metrics["loss/mlm"]) == 100.0
    losses, ids = np.array(losses), np.array(ids)
    np.testing.assert_allclose(losses[ids == 0], 1.0 + 0.1 * 10.0, rtol=1e-6)
    np.testing.assert_allclose(losses[ids == 1], 100.0, rtol=1e-6)
    # P(itm) = 3/4; 400 draws: std 0.022, so 0.1 is > 4 sigma.
    assert abs(np.mean(ids == 0) - 0.75) < 0.1


def test_sampling_keeps_untaken_state_and_validates_ratios():
    comb = Combiner([Term(Counter()), Term(_const("a", 1.0))], mixing="sample",
                    task_ratios={"count": 0.0})
    params = {"w": jnp.float32(1.0)}
    state = comb.init_state(params)
    _, metrics, state = comb(params, {}, {}, jax.random.key(0), 0, state)
    assert int(metrics["task_id"]) == 1 and int(state["count"]["n"]) == 0
    with pytest.raises(ValueError, match="task_ratios"):
        Combiner([Term(_const("a", 1.0))], mixing="sample", task_ratios={"b": 1.0})
    with pytest.raises(ValueError, match="task_ratios"):
        Combiner([Term(_const("a", 1.0))], task_ratios={"a": 1.0})
    with pytest.raises(ValueError, match="unique"):
        Combiner([Term(_const("a", 1.0)), Term(_const("a", 2.0))])
    with pytest.raises(ValueError, match="mixing"):
        Combiner([Term(_const("a", 1.0))], mixing="mean")


def test_prepare_batch_runs_each_objective_with_its_own_key():
    class Draw(Objective):
        def __init__(self, name):
            self.name = name

        def prepare_batch(self, batch, rng):
            return dict(batch, **{self.name: jax.random.uniform(rng)})

    comb = Combiner([Term(Draw("x")), Term(Draw("y"))])
    out = comb.prepare_batch({"text": 1}, jax.random.key(0))
    assert out["text"] == 1 and float(out["x"]) != float(out["y"])


def test_parse_terms_from_config_section():
    built = []

    def build(kind, fields):
        built.append((kind, fields))
        return _const(fields.pop("name"), 1.0)

    terms = parse_terms({"itc": {}, "aux": {"type": "simclr", "weight": 0.5, "ramp_steps": 4,
                                            "temperature": 0.1}},
                        build, defaults={"itc": {"weight": 2.0}})
    assert [(t.name, t.weight, t.start_step, t.ramp_steps) for t in terms] == [
        ("itc", 2.0, 0, 0), ("aux", 0.5, 0, 4)]
    assert built[1] == ("simclr", {"temperature": 0.1})


def test_select_params_include_exclude():
    tree = {"a": 1, "b": 2, "c": 3}
    assert select_params(tree, ("a", "c", "z")) == {"a": 1, "c": 3}
    assert select_params(tree, exclude=("b",)) == {"a": 1, "c": 3}
    assert select_params(tree, ("a", "b"), ("b",)) == {"a": 1}


def test_ema_teacher_update_selection_and_full_params():
    teacher = EmaTeacher(0.75, exclude=("head",))
    params = {"enc": {"w": jnp.ones(3)}, "head": {"w": jnp.ones(2)},
              "step": jnp.zeros((), jnp.int32)}
    t = teacher.init(params)
    assert set(t) == {"enc", "step"}
    new = teacher.update(t, {"enc": {"w": jnp.full(3, 5.0)}, "head": {"w": jnp.zeros(2)},
                             "step": jnp.ones((), jnp.int32)})
    np.testing.assert_allclose(new["enc"]["w"], 0.75 * 1 + 0.25 * 5, rtol=1e-6)
    assert int(new["step"]) == 1          # non-float leaves are copied
    full = EmaTeacher.full_params({"enc": {"w": jnp.zeros(3)}, "head": {"w": jnp.zeros(2)}}, new)
    chex.assert_trees_all_close(full["enc"], new["enc"])
    with pytest.raises(ValueError, match="momentum"):
        EmaTeacher(1.0)


def test_override_terms_applies_schedule_fields_and_rejects_unknowns():
    from vlp_jax.objectives.core import override_terms
    terms = [Term(_const("itc", 1.0)), Term(_const("ssl", 1.0), weight=0.5)]
    out = override_terms(terms, {"ssl": {"weight": 2, "ramp_steps": 10}})
    assert [(t.name, t.weight, t.ramp_steps) for t in out] == [("itc", 1.0, 0), ("ssl", 2.0, 10)]
    assert [t.name for t in override_terms(terms, {"ssl": {"weight": 0.0}})] == ["itc"]
    with pytest.raises(ValueError, match="valid: \\['itc', 'ssl'\\]"):
        override_terms(terms, {"mlm": {}})
    with pytest.raises(ValueError, match="unknown fields \\['wieght'\\]"):
        override_terms(terms, {"ssl": {"wieght": 1.0}})


def test_lazy_outputs_are_computed_once_per_run_and_only_where_read():
    from vlp_jax.objectives import LazyOutputs
    calls = []

    def forward():
        calls.append(1)
        return jnp.float32(2.0)

    reader = lambda name: FnObjective(name, lambda inp: (inp.outputs["shared"] * inp.params["w"],
                                                         {}))
    terms = [Term(reader("itm")), Term(reader("wpa"), task="itm"), Term(_const("mlm", 1.0))]
    outputs = LazyOutputs({"eager": 1}, {"shared": forward})
    params = {"w": jnp.float32(1.0)}
    loss = Combiner(terms)(params, outputs, {}, jax.random.key(0), 0)[0]
    assert len(calls) == 1 and float(loss) == 2.0 + 2.0 + 1.0     # one forward, two readers
    calls.clear()
    jax.eval_shape(lambda p: Combiner(terms, mixing="sample")(
        p, outputs, {}, jax.random.key(0), 0)[0], params)
    # the sampler traces each branch twice (metric shapes, then lax.switch): 2 calls from the
    # itm branch, none from the mlm branch, which does not read it
    assert len(calls) == 2
    assert "shared" in outputs and outputs["eager"] == 1

"""The shared transformer stack: masks, fused vs explicit attention, scan vs loop, the decoding
cache, modality experts, dropout, remat policies, the token embedding and the heads."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlp_jax.models.text import TextTransformer
from vlp_jax.nn.attention import (MultiHeadAttention, attention_weights, causal_mask,
                                  make_attention_mask, prefix_mask)
from vlp_jax.nn.collectives import all_gather, global_sum, l2_normalize, row_offset
from vlp_jax.nn.embed import TokenEmbedding
from vlp_jax.nn.heads import PredictionHead, match_score
from vlp_jax.nn.transformer import Encoder, ModalityExperts, MlpBlock, stack_block_params

# float32 tolerance: sums of ~W=32 products of O(1) terms through 2 blocks; the fused and
# explicit paths (and scan vs loop) differ only in accumulation order, ~1e-6 relative.
TOL = dict(rtol=1e-5, atol=1e-5)


def _x(b=2, length=6, width=32, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, length, width))


def test_prefix_mask_is_bidirectional_over_the_prefix_and_causal_after():
    m = np.asarray(prefix_mask(5, jnp.array([2, 0])))[:, 0]
    assert m.shape == (2, 5, 5)
    np.testing.assert_array_equal(m[1], np.tril(np.ones((5, 5), bool)))     # prefix 0 = causal
    assert m[0, 0, 1] and not m[0, 0, 2]            # position 0 sees the whole prefix, not 2
    assert m[0, 3, 3] and not m[0, 3, 4]            # after the prefix: causal
    np.testing.assert_array_equal(np.asarray(causal_mask(4))[0, 0], np.tril(np.ones((4, 4), bool)))


def test_fused_attention_equals_explicit_path_and_weights_are_a_distribution():
    x = _x()
    valid = jnp.array([[1, 1, 1, 1, 0, 0], [1] * 6], bool)
    mask = make_attention_mask(valid, valid) & causal_mask(6)
    mha = MultiHeadAttention(4)
    params = mha.init(jax.random.key(1), x)
    fused = mha.apply(params, x, mask=mask)
    explicit, w = mha.apply(params, x, mask=mask, return_weights=True)
    np.testing.assert_allclose(fused[0, :4], explicit[0, :4], **TOL)
    np.testing.assert_allclose(fused[1], explicit[1], **TOL)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    assert float(jnp.abs(w[0, :, :4, 4:]).max()) == 0.0          # valid rows: pads get no weight
    assert float(jnp.abs(jnp.triu(w[1], 1)).max()) == 0.0        # causal


def test_attention_weights_match_the_formula():
    q = jax.random.normal(jax.random.key(0), (1, 3, 2, 4))
    k = jax.random.normal(jax.random.key(1), (1, 5, 2, 4))
    w = attention_weights(q, k, None)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
    ref = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(w, ref, rtol=1e-5)


def test_unknown_attention_implementation_raises():
    with pytest.raises(ValueError, match="implementation"):
        MultiHeadAttention(2, implementation="flash").init(jax.random.key(0), _x())


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_stack_equals_loop_with_restacked_weights(remat):
    x, mask = _x(), causal_mask(6)
    loop = Encoder(2, 4, 64, cross_attention_every=1, remat=remat)
    ctx = _x(length=3, seed=5)
    # Jitted: op-by-op, each of the stacks' hundreds of primitives compiles on its own.
    params = jax.jit(loop.init)(jax.random.key(1), x, mask, ctx)["params"]
    scan = loop.clone(scan_layers=True, remat_policy="dots_saveable")
    stacked = stack_block_params(params, 2)
    forward = lambda m: jax.jit(lambda p: m.apply({"params": p}, x, mask, ctx,
                                                  return_weights=True))
    ya, wa = forward(loop)(params)
    yb, wb = forward(scan)(stacked)
    np.testing.assert_allclose(ya, yb, **TOL)
    np.testing.assert_allclose(wa, wb, **TOL)
    assert wa.shape == (2, 2, 4, 6, 6)
    # the scanned init has the same parameter shapes as the re-stacked loop params
    abstract = nn.meta.unbox(jax.eval_shape(
        lambda: scan.init(jax.random.key(1), x, mask, ctx))["params"])
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, abstract)
    ga = jax.jit(jax.grad(lambda p: loop.apply({"params": p}, x, mask, ctx).sum()))(params)
    gb = jax.jit(jax.grad(lambda p: scan.apply({"params": p}, x, mask, ctx).sum()))(stacked)
    np.testing.assert_allclose(stack_block_params(ga, 2)["blocks"]["mlp"]["fc1"]["kernel"],
                               gb["blocks"]["mlp"]["fc1"]["kernel"], **TOL)


def test_scan_needs_identical_blocks():
    with pytest.raises(ValueError, match="identical"):
        Encoder(2, 2, 32, cross_attention_every=2, scan_layers=True).init(
            jax.random.key(0), _x(), None, _x(seed=1))


def test_unknown_remat_policy_raises():
    with pytest.raises(ValueError, match="remat_policy"):
        Encoder(1, 2, 32, remat=True, remat_policy="dots").init(jax.random.key(0), _x())


@pytest.mark.parametrize("scan", [False, True])
def test_decoding_with_the_cache_equals_the_full_causal_pass(scan):
    text = TextTransformer(vocab_size=40, width=32, depth=2, num_heads=4, mlp_dim=64,
                           context_length=8, causal=True, scan_layers=scan)
    tokens = jnp.array([[1, 5, 9, 3, 7, 2, 0, 0], [1, 4, 4, 8, 6, 11, 12, 2]], jnp.int32)
    params = jax.jit(text.init)(jax.random.key(0), tokens)["params"]
    _, full, valid = jax.jit(lambda p: text.apply({"params": p}, tokens))(params)
    dec = text.clone(decode=True)
    cache = jax.jit(dec.init)(jax.random.key(0), tokens[:, :1])["cache"]
    one_token = jax.jit(lambda c, tok: dec.apply({"params": params, "cache": c}, tok,
                                                 mutable=["cache"]))
    steps = []
    for t in range(tokens.shape[1]):
        (_, h, _), mut = one_token(cache, tokens[:, t:t + 1])
        cache = mut["cache"]
        steps.append(h)
    steps = jnp.concatenate(steps, axis=1)
    v = np.asarray(valid)          # trailing pads: the causal pass masks them, decoding does not
    np.testing.assert_allclose(np.asarray(steps)[v], np.asarray(full)[v], **TOL)


def test_modality_experts_route_each_token_to_its_expert():
    x = _x(length=5)
    ids = jnp.array([[0, 0, 1, 1, 1], [1, 0, 1, 0, 1]])
    moe = ModalityExperts(2, 64)
    params = moe.init(jax.random.key(0), x, ids)["params"]
    y = moe.apply({"params": params}, x, ids)
    for e in range(2):
        ref = MlpBlock(64).apply({"params": params[f"expert{e}"]}, x)
        sel = np.asarray(ids == e)
        np.testing.assert_allclose(np.asarray(y)[sel], np.asarray(ref)[sel], **TOL)
    enc = Encoder(1, 2, 64, num_experts=3)
    p = enc.init(jax.random.key(0), x, modality_ids=ids)["params"]
    assert set(p["block0"]["experts"]) == {"expert0", "expert1", "expert2"}
    assert "mlp" not in p["block0"]


def test_dropout_acts_only_when_not_deterministic():
    x = _x()
    enc = Encoder(1, 2, 64, dropout_rate=0.3)
    params = enc.init(jax.random.key(0), x)["params"]
    det = enc.apply({"params": params}, x)
    np.testing.assert_allclose(det, Encoder(1, 2, 64).apply({"params": params}, x), **TOL)
    a = enc.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    b = enc.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert float(jnp.abs(a - det).max()) > 1e-2 and float(jnp.abs(a - b).max()) > 1e-2


def test_token_embedding_positions_types_and_tied_readout():
    emb = TokenEmbedding(vocab_size=11, width=8, max_length=6, num_types=2)
    tokens = jnp.array([[3, 4, 5]])
    params = nn.meta.unbox(emb.init(jax.random.key(0), tokens, 1)["params"])
    out = emb.apply({"params": params}, tokens, 1)
    ref = (params["embedding"][tokens] + params["pos_embedding"][:3]
           + params["type_embedding"][1])
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    h = jax.random.normal(jax.random.key(1), (2, 8))
    np.testing.assert_allclose(emb.apply({"params": params}, h, method="attend"),
                               h @ params["embedding"].T, **TOL)
    with pytest.raises(ValueError, match="max_length"):
        emb.apply({"params": params}, jnp.zeros((1, 7), jnp.int32))


def test_prediction_head_tied_and_untied():
    x = _x(length=3, width=8)
    table = jax.random.normal(jax.random.key(3), (11, 8))
    tied = PredictionHead(11, tied=True)
    p = tied.init(jax.random.key(0), x, table)["params"]
    assert set(p) == {"transform", "bias"}
    logits = tied.apply({"params": p}, x, table)
    assert logits.shape == (2, 3, 11) and logits.dtype == jnp.float32
    with pytest.raises(ValueError, match="table"):
        tied.apply({"params": p}, x, table[:5])
    untied = PredictionHead(7, tied=False, transform=False)
    assert set(untied.init(jax.random.key(0), x)["params"]) == {"dense"}
    np.testing.assert_allclose(match_score(jnp.array([[1.0, 3.0]])), [2.0])


def test_collectives_on_a_mesh_axis():
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    x = jnp.arange(8.0).reshape(8, 1)

    def body(local):
        g = all_gather(local, "data")
        return g[None], row_offset(local.shape[0], "data")[None], global_sum(local.sum(), "data")[None]

    spec = jax.sharding.PartitionSpec("data")
    x = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
    gathered, offsets, sums = jax.shard_map(body, mesh=mesh, in_specs=spec,
                                            out_specs=(spec, spec, spec))(x)
    gathered, offsets, sums = map(np.asarray, (gathered, offsets, sums))
    for d in range(4):                                          # tiled, in device order
        np.testing.assert_array_equal(gathered[d], np.arange(8.0).reshape(8, 1))
    np.testing.assert_array_equal(offsets, [0, 2, 4, 6])       # axis_index * local batch
    np.testing.assert_array_equal(sums, [28.0] * 4)
    assert all_gather(u0 := jnp.ones(2), None) is u0 and int(row_offset(3, None)) == 0
    u = l2_normalize(jnp.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(u, [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)


def test_decoding_with_cross_attention_equals_the_full_causal_pass():
    """A decoder block (CoCa / BLIP captioner): cached self-attention, uncached cross-attention
    to a fixed context."""
    x, ctx = _x(length=5), _x(length=3, seed=4)
    enc = Encoder(2, 4, 64, cross_attention_every=1)
    params = enc.init(jax.random.key(1), x, causal_mask(5), ctx)["params"]
    full = enc.apply({"params": params}, x, causal_mask(5), ctx)
    dec = enc.clone(decode=True, max_decode_length=5)
    cache = dec.init(jax.random.key(1), x[:, :1], None, ctx)["cache"]
    steps = []
    for t in range(5):
        y, mut = dec.apply({"params": params, "cache": cache}, x[:, t:t + 1], None, ctx,
                           mutable=["cache"])
        cache = mut["cache"]
        steps.append(y)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, **TOL)
    assert int(cache["block1"]["attn"]["cache_index"]) == 5


def test_prefill_of_a_bidirectional_prefix_then_steps_equals_the_prefix_lm_pass():
    """GIT / SimVLM decoding: the prefix (image tokens) goes into the cache in one call under
    a mask over absolute positions (bidirectional within the prefix); then one token per
    step, causal. Equals the full pass under prefix_mask."""
    x = _x(length=6)
    enc = Encoder(2, 4, 64)
    mask = prefix_mask(6, 3)
    params = enc.init(jax.random.key(2), x, mask)["params"]
    full = enc.apply({"params": params}, x, mask)
    dec = enc.clone(decode=True, max_decode_length=6)
    cache = dec.init(jax.random.key(2), x[:, :3], mask[..., :3, :])["cache"]
    y0, mut = dec.apply({"params": params, "cache": cache}, x[:, :3], mask[..., :3, :],
                        mutable=["cache"])
    steps = [y0]
    cache = mut["cache"]
    for t in range(3, 6):
        y, mut = dec.apply({"params": params, "cache": cache}, x[:, t:t + 1],
                           mutable=["cache"])
        cache = mut["cache"]
        steps.append(y)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, **TOL)
    causal_prefill = dec.apply({"params": params, "cache": dec.init(
        jax.random.key(2), x[:, :3])["cache"]}, x[:, :3], mutable=["cache"])[0]
    assert not np.allclose(causal_prefill[:, 0], full[:, 0], atol=1e-3)   # the mask mattered

"""Dense (and dropless-MoE) transformer behaviour: causality, dtypes, split/merge, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm.attention import attention_implementation
from llm.config import ModelConfig, MoEConfig
from llm.model import Transformer

TINY = ModelConfig(
    d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=64, seq_len=16,
    compute_dtype="float32",
)
TINY_MOE = ModelConfig(
    d_model=32, n_layers=2, n_heads=4, d_ff=64, vocab_size=64, seq_len=16, compute_dtype="float32",
    mlp="gelu", tie_embeddings=True, moe=MoEConfig(n_experts=4, top_k=2, every=1, d_ff_expert=32, n_shared=1),
)


def _forward_fn(cfg):
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, tokens_BT):
        return nnx.merge(graphdef, params)(tokens_BT)

    return forward, params


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (2, TINY.seq_len), 0, TINY.vocab_size, jnp.int32)


@pytest.mark.parametrize("cfg", [TINY, TINY_MOE], ids=["dense", "moe_dropless"])
def test_causality(cfg, tokens):
    forward, params = _forward_fn(cfg)
    base_BTV, _ = forward(params, tokens)
    for t in (0, 5, cfg.seq_len - 1):
        changed = tokens.at[:, t].set((tokens[:, t] + 7) % cfg.vocab_size)
        new_BTV, _ = forward(params, changed)
        np.testing.assert_allclose(new_BTV[:, :t], base_BTV[:, :t], atol=1e-6, rtol=0)
        assert float(jnp.max(jnp.abs(new_BTV[:, t:] - base_BTV[:, t:]))) > 1e-4


def test_module_holds_only_params_and_aux_shape(tokens):
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    kinds = {type(v) for v in jax.tree.leaves(nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))}
    assert kinds == {nnx.Param}
    logits_BTV, aux = model(tokens)
    assert logits_BTV.shape == (2, TINY.seq_len, TINY.vocab_size)
    assert aux["aux_loss"].dtype == jnp.float32 and float(aux["aux_loss"]) == 0.0
    assert aux["metrics"] == {}


def test_bf16_compute_gives_float32_logits_close_to_float32(tokens):
    bf16 = ModelConfig(**{**TINY.__dict__, "compute_dtype": "bfloat16"})
    f32_forward, f32_params = _forward_fn(TINY)
    f32_logits, _ = f32_forward(f32_params, tokens)
    forward, params = _forward_fn(bf16)
    logits_BTV, _ = forward(params, tokens)
    assert logits_BTV.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    # Same seed, same params: bf16 activations only perturb the logits slightly.
    assert float(jnp.max(jnp.abs(logits_BTV - f32_logits))) < 0.05 * float(jnp.max(jnp.abs(f32_logits))) + 1e-2


def test_remat_gives_same_loss_and_grads(tokens):
    def loss_and_grad(cfg):
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)

        def loss(p):
            logits_BTV, aux = nnx.merge(graphdef, p)(tokens[:, :-1])
            logp = jax.nn.log_softmax(logits_BTV)
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)) + aux["aux_loss"]

        return jax.jit(jax.value_and_grad(loss))(params)

    l0, g0 = loss_and_grad(TINY_MOE)
    l1, g1 = loss_and_grad(ModelConfig(**{**TINY_MOE.__dict__, "remat": True}))
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # The loss at init is close to uniform over the vocabulary (init is small).
    assert abs(float(l0) - np.log(TINY.vocab_size)) < 0.5


def test_init_is_depth_scaled():
    deep = ModelConfig(**{**TINY.__dict__, "n_layers": 8})
    model = Transformer(deep, rngs=nnx.Rngs(0))
    block = model.blocks[0]
    std_q = float(jnp.std(block.attn.w_q_DNH[...]))
    std_o = float(jnp.std(block.attn.w_o_NHD[...]))
    # q reads the residual: min(0.02, 1/sqrt(32)) = 0.02; o writes it: 0.02 / sqrt(2 * 8).
    assert abs(std_q - 0.02) < 0.002
    assert abs(std_o - 0.02 / 4) < 0.0008


def test_attention_kernel_choice():
    nvidia = any(d.platform == "gpu" and "nvidia" in d.device_kind.lower() for d in jax.devices()[:1])
    assert attention_implementation(jnp.bfloat16, 64) == ("cudnn" if nvidia else "xla")
    assert attention_implementation(jnp.float32, 64) == "xla"  # cuDNN flash needs 16-bit inputs
    assert attention_implementation(jnp.bfloat16, 12) == "xla"  # head dim not a multiple of 8


def test_rejects_bad_token_shape():
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[batch, time\]"):
        model(jnp.zeros((4,), jnp.int32))


def test_token_matmul_is_the_einsum_over_flattened_tokens():
    from llm.layers import token_matmul

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x_BTD = jax.random.normal(k1, (2, 5, 6))
    w_DNH = jax.random.normal(k2, (6, 3, 4))
    w_NHD = jax.random.normal(k3, (3, 4, 6))
    q_BTNH = token_matmul(x_BTD, w_DNH)
    np.testing.assert_allclose(q_BTNH, jnp.einsum("btd,dnh->btnh", x_BTD, w_DNH), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        token_matmul(q_BTNH, w_NHD, n_in=2), jnp.einsum("btnh,nhd->btd", q_BTNH, w_NHD), rtol=1e-5, atol=1e-4
    )
    # gradients too: the weight gradient is the one whose kernel the flattening changes
    g = jax.grad(lambda w: jnp.sum(token_matmul(x_BTD, w) ** 2))(w_DNH)
    g_ref = jax.grad(lambda w: jnp.sum(jnp.einsum("btd,dnh->btnh", x_BTD, w) ** 2))(w_DNH)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=r"last 2 axes \(5, 6\) differ from w's first \(3, 4\)"):
        token_matmul(x_BTD, w_NHD, n_in=2)


def test_softmax_last_matches_jax_softmax_values_and_gradients():
    from llm.attention import softmax_last

    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 7)) * 4
    x = jnp.where(jnp.tril(jnp.ones((5, 7), bool)), x, jnp.finfo(jnp.float32).min)  # masked like attention
    g = jax.random.normal(jax.random.key(1), x.shape)
    np.testing.assert_allclose(jax.jit(softmax_last)(x), jax.nn.softmax(x, axis=-1), rtol=1e-6, atol=1e-7)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(softmax_last(x) * g)))(x)  # jitted: one compile, not one per op
    grad_ref = jax.jit(jax.grad(lambda x: jnp.sum(jax.nn.softmax(x, axis=-1) * g)))(x)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-6)
    assert np.all(grad[..., 0, 1:] == 0)  # masked scores get no gradient
    # and under vmap (population training vmaps the step)
    vgrad = jax.jit(jax.vmap(jax.grad(lambda x, g: jnp.sum(softmax_last(x) * g))))(x, g)
    np.testing.assert_allclose(vgrad, grad_ref, rtol=1e-5, atol=1e-6)

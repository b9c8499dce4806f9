"""LoRA aggregation: FLoRA's exact stacking against the naive sum, the FedIT and zero-padding
baselines, PEFT round trips on the real stories260K model, the Triton kernels (interpreter)
against the CPU path, and bad input refused with nothing changed."""

import copy
import importlib.util

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from ferret import lora
from ferret.lora import LoraAdapter, LoraError, LoraTerm
from ferret.fl.models import stories260k_dir

RANKS = [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_adapter(ranks_by_module, shapes, alpha_over_r=2.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    terms = {}
    for name, (out_f, in_f) in shapes.items():
        r = ranks_by_module if isinstance(ranks_by_module, int) else ranks_by_module[name]
        terms[name] = [LoraTerm(torch.randn(r, in_f, generator=g).to(dtype),
                                torch.randn(out_f, r, generator=g).to(dtype), alpha_over_r)]
    return LoraAdapter(terms)


SHAPES = {"layer.a": (48, 40), "layer.b": (40, 72)}


def naive(adapters, p, name):
    return sum(pi * t.coef * (t.B.double() @ t.A.double()) for pi, a in zip(p, adapters) for t in a.terms[name])


@pytest.fixture
def clients():
    return [random_adapter(r, SHAPES, alpha_over_r=2.0 if i % 2 else 16.0 / r, seed=i) for i, r in enumerate(RANKS)]


def test_stack_equals_naive_weighted_sum(clients):
    counts = [120, 80, 50, 50, 30, 30, 10, 10, 10, 5]
    stacked = lora.stack(clients, weights=counts)
    p = [c / sum(counts) for c in counts]
    for name in SHAPES:
        assert stacked.rank(name) == sum(RANKS)
        torch.testing.assert_close(stacked.delta(name).double(), naive(clients, p, name), rtol=1e-5, atol=1e-4)


def test_stack_partial_participation(clients):
    chosen = [0, 3, 7]
    stacked = lora.stack([clients[i] for i in chosen], weights=[3.0, 1.0, 1.0])
    for name in SHAPES:
        assert stacked.rank(name) == 64 + 16 + 4
        torch.testing.assert_close(stacked.delta(name).double(),
                                   naive([clients[i] for i in chosen], [0.6, 0.2, 0.2], name), rtol=1e-5, atol=1e-4)


def test_merge_adds_the_stacked_update_in_place(clients):
    stacked = lora.stack(clients)
    base = {f"{n}.weight": torch.randn(*s) for n, s in SHAPES.items()}
    before = copy.deepcopy(base)
    lora.merge_into(base, stacked)
    for name in SHAPES:
        torch.testing.assert_close(base[f"{name}.weight"], before[f"{name}.weight"] + stacked.delta(name),
                                   rtol=1e-5, atol=1e-4)


def test_merge_into_low_precision_weights_rounds_once(clients):
    stacked = lora.stack(clients[:3])
    for dtype in (torch.bfloat16, torch.float16):
        base = {f"{n}.weight": torch.randn(*s).to(dtype) for n, s in SHAPES.items()}
        want = {k: (v.float() + stacked.delta(k[: -len(".weight")])).to(dtype) for k, v in base.items()}
        lora.merge_into(base, stacked)
        for k in base:
            torch.testing.assert_close(base[k], want[k], rtol=0, atol=0)


def test_fedit_equals_flora_for_one_client(clients):
    one = [clients[2]]
    for name in SHAPES:
        torch.testing.assert_close(lora.fedit(one).delta(name), lora.stack(one).delta(name), rtol=1e-6, atol=1e-5)


def test_fedit_averages_factors_not_products():
    a, b = (random_adapter(8, SHAPES, seed=s) for s in (1, 2))
    got = lora.fedit([a, b], weights=[1, 3])
    for name in SHAPES:
        ta, tb = a.terms[name][0], b.terms[name][0]
        want = (0.25 * ta.coef * ta.B + 0.75 * tb.coef * tb.B) @ (0.25 * ta.A + 0.75 * tb.A)
        torch.testing.assert_close(got.delta(name), want, rtol=1e-5, atol=1e-4)
        assert not torch.allclose(got.delta(name), lora.stack([a, b], weights=[1, 3]).delta(name), atol=1e-2)


def test_zero_padding_equals_fedit_for_equal_ranks():
    clients = [random_adapter(8, SHAPES, seed=s) for s in range(4)]
    w = [4, 3, 2, 1]
    for name in SHAPES:
        torch.testing.assert_close(lora.zero_pad(clients, w).delta(name), lora.fedit(clients, w).delta(name))


def test_zero_padding_heterogeneous_ranks(clients):
    chosen = clients[3:6]  # ranks 16, 8, 8
    got = lora.zero_pad(chosen)
    for name in SHAPES:
        assert got.rank(name) == 16
        A = sum(torch.nn.functional.pad(c.terms[name][0].A, (0, 0, 0, 16 - c.rank(name))) for c in chosen) / 3
        B = sum(c.terms[name][0].coef * torch.nn.functional.pad(c.terms[name][0].B, (0, 16 - c.rank(name)))
                for c in chosen) / 3
        torch.testing.assert_close(got.delta(name), B @ A, rtol=1e-5, atol=1e-4)


def test_fedit_refuses_heterogeneous_ranks(clients):
    with pytest.raises(LoraError, match="equal rank.*ranks \\[64, 32\\]"):
        lora.fedit(clients[:2])


# --- PEFT on the real stories260K model -----------------------------------------------------------


def stories():
    return AutoModelForCausalLM.from_pretrained(stories260k_dir()).eval()


def peft_client(rank, alpha, seed, use_rslora=False):
    torch.manual_seed(seed)
    model = get_peft_model(stories(), LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS,
                                                 use_rslora=use_rslora))
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


TOKENS = torch.tensor([[1, 45, 300, 12, 99, 7, 250, 3]])


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.fixture(scope="module")
def peft_clients():
    return [peft_client(8, 16, 0), peft_client(4, 4, 1, use_rslora=True), peft_client(2, 8, 2)]


def test_peft_round_trip_on_stories260k(peft_clients, tmp_path):
    weights = [50, 30, 20]
    adapters = [lora.from_peft(m) for m in peft_clients]
    assert adapters[1].terms["model.layers.0.self_attn.q_proj"][0].coef == pytest.approx(4 / 2)  # rslora: α/√r
    stacked = lora.stack(adapters, weights)

    by_hand = stories()
    with torch.no_grad():
        for m, w in zip(peft_clients, weights):
            for path, module in m.named_modules():
                if hasattr(module, "lora_A") and "default" in module.lora_A:
                    name = path.removeprefix("base_model.model.")
                    delta = module.lora_B["default"].weight @ module.lora_A["default"].weight
                    by_hand.get_submodule(name).weight += w / 100 * module.scaling["default"] * delta
    want = logits(by_hand)

    merged = stories()
    lora.merge_into(merged, stacked)
    torch.testing.assert_close(logits(merged), want, rtol=1e-4, atol=1e-4)

    merged.save_pretrained(tmp_path / "merged")  # transformers loads what we wrote
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(reloaded), logits(merged), rtol=0, atol=0)

    unmerged = lora.to_peft_model(stories(), stacked)  # rank 14 PEFT adapter, kept unmerged
    assert unmerged.peft_config["default"].r == 14
    torch.testing.assert_close(logits(unmerged), want, rtol=1e-4, atol=1e-4)

    unmerged.save_pretrained(tmp_path / "adapter")
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(stories(), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(loaded), want, rtol=1e-4, atol=1e-4)


def test_from_peft_state_dict_matches_model(peft_clients):
    for model in peft_clients:
        from_model = lora.from_peft(model)
        from_state = lora.from_peft(get_peft_model_state_dict(model), model.peft_config["default"])
        assert from_model.modules == from_state.modules and len(from_model.modules) == 5 * len(TARGETS)
        for name in from_model.modules:
            torch.testing.assert_close(from_state.delta(name), from_model.delta(name), rtol=0, atol=0)


def test_rank_and_alpha_patterns_are_honoured():
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        rank_pattern={"v_proj": 2}, alpha_pattern={"layers.0.self_attn.q_proj": 1})
    model = get_peft_model(stories(), config)
    adapter = lora.from_peft(get_peft_model_state_dict(model), config)
    assert adapter.rank("model.layers.1.self_attn.v_proj") == 2
    assert adapter.terms["model.layers.1.self_attn.v_proj"][0].coef == 4.0
    assert adapter.terms["model.layers.0.self_attn.q_proj"][0].coef == 0.25
    assert adapter.terms["model.layers.1.self_attn.q_proj"][0].coef == 2.0


def test_fan_in_fan_out_conv1d():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).eval()
    clients = []
    for seed, r in enumerate([4, 2]):
        torch.manual_seed(seed)
        m = get_peft_model(copy.deepcopy(gpt2), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["c_attn", "c_fc"],
                                                           fan_in_fan_out=True))
        with torch.no_grad():
            for name, param in m.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1)
        clients.append(m)
    stacked = lora.stack([lora.from_peft(m) for m in clients])
    assert stacked.fan_in_fan_out
    tokens = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        merged = copy.deepcopy(gpt2)
        lora.merge_into(merged, stacked)
        w = merged.transformer.h[0].attn.c_attn.weight
        delta = stacked.delta("transformer.h.0.attn.c_attn")  # (out, in); Conv1D stores (in, out)
        torch.testing.assert_close(w - gpt2.transformer.h[0].attn.c_attn.weight, delta.T, rtol=1e-5, atol=1e-6)
        unmerged = lora.to_peft_model(copy.deepcopy(gpt2), stacked)
        torch.testing.assert_close(unmerged(tokens).logits, merged(tokens).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(merged(tokens).logits, gpt2(tokens).logits, atol=1e-3)


# --- bad input: a clear error, nothing changed -----------------------------------------------------


def test_bad_adapters_are_refused():
    A, B = torch.randn(4, 10), torch.randn(6, 4)
    with pytest.raises(LoraError, match="rank mismatch"):
        LoraAdapter({"m": [LoraTerm(A, torch.randn(6, 3), 1.0)]})
    with pytest.raises(LoraError, match="NaN or Inf"):
        LoraAdapter({"m": [LoraTerm(A, B.clone().fill_(float("nan")), 1.0)]})
    with pytest.raises(LoraError, match="NaN or Inf"):
        LoraAdapter({"m": [LoraTerm(A.clone().fill_(float("inf")), B, 1.0)]})
    with pytest.raises(LoraError, match="A is torch.float32 but B is torch.bfloat16"):
        LoraAdapter({"m": [LoraTerm(A, B.bfloat16(), 1.0)]})
    with pytest.raises(LoraError, match="mixed dtypes"):
        LoraAdapter({"m": [LoraTerm(A, B, 1.0)], "n": [LoraTerm(A.half(), B.half(), 1.0)]})


def test_bad_client_sets_are_refused(clients):
    a, b = clients[4], clients[5]
    missing = LoraAdapter({"layer.a": a.terms["layer.a"]})
    with pytest.raises(LoraError, match="client 1 adapts different modules.*missing \\['layer.b'\\]"):
        lora.stack([a, missing])
    with pytest.raises(LoraError, match="mixed dtypes"):
        lora.stack([a, random_adapter(8, SHAPES, dtype=torch.bfloat16)])
    with pytest.raises(LoraError, match="client 1's update is \\(40, 41\\)"):
        lora.stack([random_adapter(8, {"layer.a": (40, 40), "layer.b": (40, 72)}),
                    random_adapter(8, {"layer.a": (40, 41), "layer.b": (40, 72)})])
    for weights, message in [([1, 0], None), ([0, 0], "sum to a positive"), ([1, -1], "non-negative"),
                             ([1, float("nan")], "finite"), ([1], "1 weights for 2")]:
        if message is None:
            lora.stack([a, b], weights)
        else:
            with pytest.raises(LoraError, match=message):
                lora.stack([a, b], weights)


def test_merge_refuses_misfits_and_changes_nothing(clients):
    stacked = lora.stack(clients[:2])
    base = {"layer.a.weight": torch.randn(48, 40), "layer.b.weight": torch.randn(40, 71)}
    before = copy.deepcopy(base)
    with pytest.raises(LoraError, match="'layer.b': the adapter makes a 40x72 update but the base weight is 40x71"):
        lora.merge_into(base, stacked)
    del base["layer.b.weight"]
    with pytest.raises(LoraError, match="no weight for module 'layer.b'"):
        lora.merge_into(base, stacked)
    torch.testing.assert_close(base["layer.a.weight"], before["layer.a.weight"], rtol=0, atol=0)


def test_from_peft_refuses_contradictions():
    A, B = torch.randn(4, 8), torch.randn(8, 4)
    state = {"base_model.model.m.lora_A.weight": A, "base_model.model.m.lora_B.weight": B}
    with pytest.raises(LoraError, match="A has rank 4 but the config says r=8"):
        lora.from_peft(state, {"r": 8, "lora_alpha": 16})
    with pytest.raises(LoraError, match="has lora_A but not lora_B"):
        lora.from_peft({"base_model.model.m.lora_A.weight": A}, {"r": 4, "lora_alpha": 8})
    with pytest.raises(LoraError, match="DoRA"):
        lora.from_peft(state, {"r": 4, "lora_alpha": 8, "use_dora": True})
    with pytest.raises(LoraError, match="needs its LoraConfig"):
        lora.from_peft(state)
    assert lora.from_peft(state, {"r": 4, "lora_alpha": 8}).terms["m"][0].coef == 2.0


# --- issue 14: hostile input raises LoraError; merges never write non-finite values ------------------


def test_from_peft_bad_configs_and_values_raise_lora_errors():
    A, B = torch.randn(4, 8), torch.randn(8, 4)
    state = {"base_model.model.m.lora_A.weight": A, "base_model.model.m.lora_B.weight": B}
    for config, message in [({"r": 0, "lora_alpha": 8}, "r must be a positive int"),
                            ({"r": -4, "lora_alpha": 8}, "r must be a positive int"),
                            ({"r": "4", "lora_alpha": 8}, "r must be a positive int"),
                            ({"r": 4, "lora_alpha": None}, "lora_alpha must be a finite number"),
                            ({"r": 4, "lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
                            ({"r": 4, "lora_alpha": 8, "rank_pattern": {"m": 0}}, "r must be a positive int")]:
        with pytest.raises(LoraError, match=message):
            lora.from_peft(state, config)
    empty = {"base_model.model.m.lora_A.weight": torch.randn(0, 8),
             "base_model.model.m.lora_B.weight": torch.randn(8, 0)}
    with pytest.raises(LoraError, match="r must be a positive int"):
        lora.from_peft(empty, {"r": 0, "lora_alpha": 8})
    with pytest.raises(LoraError, match="not a tensor"):
        lora.from_peft({"base_model.model.m.lora_A.weight": A.tolist(), "base_model.model.m.lora_B.weight": B},
                       {"r": 4, "lora_alpha": 8})


@pytest.mark.parametrize("coef,message", [(None, "a real number"), ("abc", "a real number"), ("2", "a real number"),
                                          (True, "a real number"), (float("inf"), "finite"),
                                          (1e39, "float32")])
def test_bad_scalings_raise_lora_errors(coef, message):
    with pytest.raises(LoraError, match=message):
        LoraAdapter({"m": [LoraTerm(torch.randn(4, 10), torch.randn(6, 4), coef)]})


def test_bad_and_huge_weights(clients):
    a, b = clients[4], clients[5]
    for weights in (["1", 2], [True, 1], [None, 1]):
        with pytest.raises(LoraError, match="real numbers"):
            lora.stack([a, b], weights)
    huge = lora.stack([a, b], [1e308, 1e308])
    for name in SHAPES:
        torch.testing.assert_close(huge.delta(name), lora.stack([a, b]).delta(name), rtol=0, atol=0)
        assert float(huge.delta(name).abs().max()) > 0


def test_merge_refuses_overflow_into_low_precision_weights(clients):
    big = [random_adapter(8, SHAPES, alpha_over_r=1e4, seed=s) for s in range(2)]
    base = {f"{n}.weight": torch.randn(*s).half() for n, s in SHAPES.items()}
    before = copy.deepcopy(base)
    with pytest.raises(LoraError, match="non-finite.*'layer.a'.*nothing was merged"):
        lora.merge_into(base, lora.stack(big))
    for k in base:
        assert torch.equal(base[k], before[k])


def test_merge_checks_adapters_again_because_they_alias_the_callers_tensors(clients):
    adapter = random_adapter(4, SHAPES, seed=9)
    stacked = lora.stack([adapter, clients[0]])
    adapter.terms["layer.b"][0].B[2, 1] = float("nan")  # written after the adapter was built
    base = {f"{n}.weight": torch.randn(*s) for n, s in SHAPES.items()}
    before = copy.deepcopy(base)
    with pytest.raises(LoraError, match="'layer.b'.*NaN or Inf"):
        lora.merge_into(base, stacked)
    for k in base:
        assert torch.equal(base[k], before[k])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"))])
def test_checked_merge_writes_what_the_unchecked_merge_writes(clients, backend, monkeypatch):
    from ferret.lora import merge

    stacked = lora.stack(clients[:3])
    base = {f"{n}.weight": torch.randn(*s).bfloat16() for n, s in SHAPES.items()}
    fast = copy.deepcopy(base)
    lora.merge_into(fast, stacked, backend=backend)
    monkeypatch.setattr(merge, "_cannot_overflow", lambda *args: False)
    lora.merge_into(base, stacked, backend=backend)
    for k in base:
        assert torch.equal(base[k], fast[k])


# --- a whole-model merge waits on the device once --------------------------------------------------


class HostReads(TorchFunctionMode):
    """Counts the reads of tensor values to the host, each a wait on a GPU: the Python calls in
    :data:`READS`, and ``aten._local_scalar_dense`` reached otherwise (a tensor passed where C++
    takes a number, an ``item()`` inside an op)."""

    READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
             torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__, torch.equal, torch.allclose,
             torch.is_nonzero, torch.Tensor.is_nonzero}

    def __init__(self):
        super().__init__()
        self.count, self.inside = 0, 0
        self.scalars = _ScalarReads(self)

    def __enter__(self):
        self.scalars.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.scalars.__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func not in self.READS:
            return func(*args, **(kwargs or {}))
        self.count += 1
        self.inside += 1  # its own _local_scalar_dense is not a second read
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.inside -= 1


class _ScalarReads(TorchDispatchMode):
    def __init__(self, reads: HostReads):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.reads.inside:
            self.reads.count += 1
        return func(*args, **(kwargs or {}))


def model_merge(n_modules, dtype=torch.float32, alpha_over_r=2.0, seed=0):
    """A stack of three clients over ``n_modules`` modules of several shapes, and base weights."""
    shapes = {f"layers.{i}.{kind}": shape for i in range(n_modules // 2 + 1)
              for kind, shape in (("attn", (24, 24)), ("mlp", (40, 24)))}
    shapes = dict(list(shapes.items())[:n_modules])
    clients = [random_adapter(r, shapes, alpha_over_r=alpha_over_r, seed=seed + r) for r in (4, 2, 1)]
    g = torch.Generator().manual_seed(seed)
    base = {f"{n}.weight": torch.randn(*s, generator=g).to(dtype) for n, s in shapes.items()}
    return lora.stack(clients, [3, 2, 1]), base


def host_reads_of_merge(stacked, base) -> int:
    with HostReads() as reads:
        lora.merge_into(base, stacked, backend="torch")
    return reads.count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_whole_model_merge_reads_the_device_once_whatever_the_number_of_modules(dtype):
    counts = {}
    for n_modules in (2, 20):
        stacked, base = model_merge(n_modules, dtype)
        want = {k: (v.float() + stacked.delta(k[: -len(".weight")])).to(dtype) for k, v in base.items()}
        counts[n_modules] = host_reads_of_merge(stacked, base)
        for k in base:
            torch.testing.assert_close(base[k], want[k], rtol=0 if dtype == torch.float32 else 1e-2, atol=1e-4)
    assert counts == {2: 1, 20: 1}


def test_host_read_counter_sees_each_kind_of_read():
    x = torch.ones(3)
    with HostReads() as reads:
        x.tolist(), x[0].item(), bool(x[0] > 0), float(x[1]), x.cpu(), x.numpy()
        torch.full((2,), x[0]), torch.zeros(3).add(x, alpha=x[1])  # read in C++
    assert reads.count == 8


def test_merges_the_bound_cannot_clear_take_one_more_read_for_all_of_them():
    # A is huge and B tiny: the norm bound fails for every fp16 module, but the update is small,
    # so each module is merged into a copy first; all of those verdicts come back in one read.
    counts = {}
    for n_modules in (2, 20):
        stacked, base = model_merge(n_modules, torch.float16)
        stacked = LoraAdapter({n: [LoraTerm(t.A * 1e3, t.B * 1e-3, t.coef) for t in ts]
                               for n, ts in stacked.terms.items()})
        want = {k: (v.float() + stacked.delta(k[: -len(".weight")])).half() for k, v in base.items()}
        counts[n_modules] = host_reads_of_merge(stacked, base)
        for k in base:
            torch.testing.assert_close(base[k], want[k], rtol=1e-2, atol=1e-2)
    assert counts == {2: 2, 20: 2}


def test_one_overflowing_module_of_many_is_named_and_nothing_is_merged():
    stacked, base = model_merge(20, torch.float16)
    terms = dict(stacked.terms)
    bad = "layers.7.mlp"
    terms[bad] = [LoraTerm(t.A, t.B, 1e4) for t in terms[bad]]
    before = copy.deepcopy(base)
    with pytest.raises(LoraError, match=f"non-finite.*'{bad}'.*nothing was merged"):
        lora.merge_into(base, LoraAdapter(terms))
    for k in base:
        assert torch.equal(base[k], before[k])


def test_scalings_that_overflow_the_stacked_factors_are_refused():
    # coef · A overflows fp32 though every factor is finite and coef · |A| · |B| is small: the
    # stacked factors, which the merge multiplies, hold Inf, and so would the weight.
    A, B = torch.full((2, 8), 1e30), torch.full((6, 2), 1e-35)
    adapter = LoraAdapter({"m": [LoraTerm(A, B, 1e10)]})
    base = {"m.weight": torch.randn(6, 8)}
    before = base["m.weight"].clone()
    with pytest.raises(LoraError, match="non-finite.*'m'.*torch.float32 weight.*nothing was merged"):
        lora.merge_into(base, adapter)
    assert torch.equal(base["m.weight"], before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factors_stacked_again_past_the_memory_cap_merge_the_same_bits(dtype, monkeypatch):
    from ferret.lora import merge

    stacked, base = model_merge(9, dtype)
    held = copy.deepcopy(base)
    lora.merge_into(held, stacked)
    monkeypatch.setattr(merge, "KEEP_BYTES", 2000)  # the first module's factors and few others are held
    lora.merge_into(base, stacked)
    for k in base:
        assert torch.equal(base[k], held[k])


def test_nan_in_a_module_stacked_again_past_the_memory_cap_is_found(monkeypatch):
    from ferret.lora import merge

    stacked, base = model_merge(9)
    stacked.terms["layers.3.mlp"][1].A[0, 0] = float("inf")  # the client's tensor, after stacking
    before = copy.deepcopy(base)
    monkeypatch.setattr(merge, "KEEP_BYTES", 0)
    with pytest.raises(LoraError, match="'layers.3.mlp'.*NaN or Inf"):
        lora.merge_into(base, stacked)
    for k in base:
        assert torch.equal(base[k], before[k])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA synchronizations; no GPU here")
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_model_merge_synchronizes_the_gpu_once(backend, dtype):
    import warnings

    stacked, base = model_merge(20, dtype)
    stacked = LoraAdapter({n: [LoraTerm(t.A.cuda(), t.B.cuda(), t.coef) for t in ts] for n, ts in stacked.terms.items()})
    base = {k: v.cuda() for k, v in base.items()}
    lora.merge_into(copy.deepcopy(base), stacked, backend=backend)  # compiles the kernel, fills the caches
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            lora.merge_into(base, stacked, backend=backend)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs

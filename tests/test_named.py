"""Several named adapters on one frozen backbone: each set alone as its own model, mixed batches equal to each sample
run alone, refusals that leave the model as it was, and load_runs + predict(adapter_names=...)."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mslora
from conftest import make_model, sample_input

MIXABLE = {  # backbone -> feature-space methods (with small options) that share it
    "resnet": [("mslora", {"rank": 4, "groups": 2}), ("adapter", {"rank": 4}), ("conv_adapter", {}),
               ("lorand", {"hidden": 2, "branches": 2})],
    "vit": [("mslora", {"rank": 8}), ("mona", {}), ("adaptformer", {"rank": 4}), ("adapter", {"rank": 4})],
    "swin": [("mslora", {"rank": 8}), ("adaptformer", {"rank": 4})],  # windows: (k B, ...) features
    "convnext": [("mslora", {"rank": 8}), ("mona", {})],
    "tnt": [("mslora", {"rank": 8}), ("adapter", {"rank": 4})],  # a tuple output's element, row by row
}


def trained(backbone: str, method: str, options: dict, num_classes: int, seed: int, path) -> tuple:
    """An adapted model (its head of ``num_classes``), its trainable tensors drawn at random, saved to ``path``."""
    model = make_model(backbone)
    model.reset_classifier(num_classes)
    mslora.adapt(model, method, **options)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    mslora.save_adapter(model, path)
    return model.eval(), path


@pytest.mark.parametrize("backbone", sorted(MIXABLE))
def test_a_mixed_batch_equals_each_sample_alone(backbone, tmp_path):
    alone = [trained(backbone, m, o, 3 + i, i, tmp_path / f"{i}.safetensors")
             for i, (m, o) in enumerate(MIXABLE[backbone])]
    shared = make_model(backbone).eval()
    for i, (_, path) in enumerate(alone):
        mslora.load_adapter(shared, path, name=f"s{i}")
    assert list(mslora.named_adapters(shared)) == [f"s{i}" for i in range(len(alone))]
    x = sample_input(shared, batch=7)
    names = [f"s{(i * 3) % len(alone)}" for i in range(7)]
    with torch.no_grad(), mslora.mixed_batch(shared, names):
        mixed = shared(x)
    with torch.no_grad():
        for i, name in enumerate(names):
            model = alone[int(name[1:])][0]
            ref = model(x[i:i + 1])[0]
            assert torch.allclose(mixed[i, :len(ref)], ref, atol=1e-5, rtol=0)
            assert torch.isinf(mixed[i, len(ref):]).all()  # other sets' classes: -inf logits
        for k, (model, _) in enumerate(alone):  # one set at a time: each is its own model
            mslora.set_adapter(shared, f"s{k}")
            assert torch.allclose(shared(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backbone,method,options", [("resnet", "mslora", {"rank": 4, "groups": 2}),
                                                     ("vit", "mslora", {"rank": 8}), ("swin", "mslora", {"rank": 8}),
                                                     ("resnet", "conv_adapter", {})])  # hooks beside the site
def test_alike_adapters_run_at_once_and_equal_each_alone(backbone, method, options, tmp_path):
    """Three sets of one method and config (stacked: MSLoRA's own batched form, others one vmap per site) and one
    other method's set, in a batch with all four and in one of the three alike sets only."""
    other = MIXABLE[backbone][1]
    specs = [(method, options)] * 3 + [other]
    alone = [trained(backbone, m, o, 3 + i, i, tmp_path / f"{i}.safetensors") for i, (m, o) in enumerate(specs)]
    shared = make_model(backbone).eval()
    for i, (_, path) in enumerate(alone):
        mslora.load_adapter(shared, path, name=f"s{i}")
    x = sample_input(shared, batch=9)
    for order in ((0, 1, 2, 3, 1, 0, 2, 2, 1), (2, 0, 0, 1, 2, 1, 0, 0, 2)):  # with the other set; the alike only
        names = [f"s{i}" for i in order]
        for grad in (False, True):  # with gradients: each set on its rows, no stacking
            with torch.set_grad_enabled(grad), mslora.mixed_batch(shared, names):
                mixed = shared(x).detach()
            with torch.no_grad():
                for i, name in enumerate(names):
                    ref = alone[int(name[1:])][0](x[i:i + 1])[0]
                    assert torch.allclose(mixed[i, :len(ref)], ref, atol=1e-5, rtol=0)
    stacked = [g[0].stacked for g in mslora.core.named.router(shared).groups.values() if hasattr(g[0], "stacked")]
    assert stacked and all(s[2] is not None for s in stacked)  # every site with several alike sets ran stacked


@pytest.mark.parametrize("backbone", ["resnet", "vit", "swin"])
def test_lora_sets_mix_through_peft_adapter_names(backbone, tmp_path):
    """Two LoRA sets (PEFT layers holding both, fed adapter_names per row: Swin's window attention has B x windows
    rows) and a feature-space set, mixed, equal to each alone."""
    specs = [("lora", {"rank": 2}), ("lora", {"rank": 4, "alpha": 8.0}), MIXABLE[backbone][0]]
    alone = [trained(backbone, m, o, 3 + i, i, tmp_path / f"{i}.safetensors") for i, (m, o) in enumerate(specs)]
    shared = make_model(backbone).eval()
    for i, (_, path) in enumerate(alone):
        mslora.load_adapter(shared, path, name=f"s{i}")
    x = sample_input(shared, batch=6)
    names = [f"s{i}" for i in (2, 0, 1, 1, 0, 2)]
    with torch.no_grad(), mslora.mixed_batch(shared, names):
        mixed = shared(x)
    with torch.no_grad():
        for i, name in enumerate(names):
            ref = alone[int(name[1:])][0](x[i:i + 1])[0]  # ResNet's random LoRA sets give logits near 20: relative
            assert torch.allclose(mixed[i, :len(ref)], ref, atol=1e-5, rtol=1e-5)
        for k, (model, _) in enumerate(alone):
            mslora.set_adapter(shared, f"s{k}")
            assert torch.allclose(shared(x), model(x), atol=1e-5, rtol=0)
    _, dora = trained(backbone, "dora", {"rank": 2}, 3, 9, tmp_path / "dora.safetensors")
    with pytest.raises(ValueError, match="PEFT cannot mix 'dora' adapters in a batch"):
        mslora.load_adapter(shared, dora, name="d")
    with torch.no_grad(), mslora.mixed_batch(shared, names):  # the LoRA sets' layers keep their adapters
        assert torch.equal(shared(x), mixed)


def test_n_adapters_hold_one_backbone(tmp_path):
    files = [trained("vit", m, o, 3 + i, i, tmp_path / f"{i}.safetensors")[1]
             for i, (m, o) in enumerate(MIXABLE["vit"])]
    shared = make_model("vit")
    backbone = {k: v for k, v in shared.state_dict().items() if not k.startswith("head.")}
    for i, path in enumerate(files):
        mslora.load_adapter(shared, path, name=f"s{i}")
    numel = sum(t.numel() for t in shared.state_dict().values())
    adapters = sum(t.numel() for f in files for t in load_file(f).values())
    assert numel == sum(t.numel() for t in backbone.values()) + adapters


@pytest.mark.parametrize("method,options", [("vpt", {"num_tokens": 2}), ("rlrr", {}), ("bitfit", {}), ("ssf", {}),
                                            ("dora", {"rank": 2}), ("pissa", {"rank": 2}), ("hira", {"rank": 2})])
def test_methods_that_change_the_shared_backbone_refuse_to_share_it(method, options, tmp_path):
    _, feature = trained("vit", "mslora", {"rank": 8}, 3, 0, tmp_path / "a.safetensors")
    _, other = trained("vit", method, options, 5, 1, tmp_path / "b.safetensors")
    for first, second in ((feature, other), (other, feature)):
        shared = make_model("vit").eval()
        mslora.load_adapter(shared, first, name="first")
        x = sample_input(shared)
        with torch.no_grad():
            before = shared(x)
        keys = set(shared.state_dict())
        with pytest.raises(ValueError, match=f"(PEFT cannot mix )?'{method}' (adapters in a batch|changes what every "
                                             "sample shares|acts through hooks)"):
            mslora.load_adapter(shared, second, name="second")
        with torch.no_grad():
            assert torch.equal(shared(x), before)  # nothing of the refused set stays
        assert set(shared.state_dict()) == keys and list(mslora.named_adapters(shared)) == ["first"]


def test_named_adapters_say_what_is_wrong(tmp_path):
    _, path = trained("resnet", "mslora", {"rank": 4, "groups": 2}, 3, 0, tmp_path / "a.safetensors")
    model = make_model("resnet")
    mslora.load_adapter(model, path, name="a")
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        mslora.load_adapter(model, path, name="a")
    with pytest.raises(ValueError, match="no adapter named 'b'; it has: a"):
        mslora.set_adapter(model, "b")
    with pytest.raises(ValueError, match="no adapter named 'b'"), mslora.mixed_batch(model, ["a", "b"]):
        pass
    plain = make_model("resnet")
    plain.reset_classifier(3)
    mslora.load_adapter(plain, path)
    with pytest.raises(ValueError, match="unnamed adapter: load every adapter of a model with a name"):
        mslora.load_adapter(plain, path, name="b")


def test_load_runs_predicts_each_image_with_its_own_adapter(two_runs):
    model = mslora.load_runs({name: run for name, (run, _) in two_runs.items()}, device="cpu")
    images = [p for _, paths in two_runs.values() for p in paths[::5]]
    names = [name for name, (_, paths) in two_runs.items() for _ in paths[::5]]
    order = np.random.default_rng(0).permutation(len(images))  # interleaved
    images, names = [images[i] for i in order], [names[i] for i in order]
    mixed = mslora.predict(model, images, batch_size=4, adapter_names=names)
    for name, (run, _) in two_runs.items():
        alone = mslora.load_run(run, device="cpu")
        rows = [i for i, n in enumerate(names) if n == name]
        ref = mslora.predict(alone, [images[i] for i in rows])
        for i, r in zip(rows, ref):
            assert mixed[i]["label"] == r["label"] and len(mixed[i]["probabilities"]) == len(alone.classes)
            assert np.allclose(mixed[i]["probabilities"], r["probabilities"], atol=1e-5)
    with pytest.raises(ValueError, match="2 adapter_names for 3 images"):
        mslora.predict(model, images[:3], adapter_names=names[:2])

"""Masked diffusion (METHOD.md §7): SUBS, t routing, the exact NELBO, the sampler, B = 1 equals the
end-to-end baseline, the known-entropy check on a Markov source, and bad inputs."""

import math
import subprocess

import pytest
import torch

from dblocks_titan.data.markov import MarkovSource
from dblocks_titan.data.chars import CharTokenizer, MASK_ID
from dblocks_titan.data.text8 import Text8DataLoader
from dblocks_titan.diffusion import block_t_range, t_to_block, widened_t_range
from dblocks_titan.models import mdlm
from dblocks_titan.nelbo import nelbo_per_range
from dblocks_titan import objectives
from dblocks_titan.objectives import absorb, logit_chunks, masked_corrupt, masked_nelbo
from dblocks_titan.sampling import mdlm_sample
from dblocks_titan.toml_config import check_inputs, InputError, load_toml

from test_distributed import ENV, fsdp_matches_one_process, PY, ROOT, run, trace

LN27 = math.log(27)


def build(num_blocks: int, flavor: str = "debugmodel", seed: int = 0) -> mdlm.MDLM:
    torch.manual_seed(seed)
    config = mdlm.mdlm_config(flavor, end_to_end=num_blocks == 1)
    config.num_blocks = num_blocks
    model = config.build()
    model.init_states()
    return model


def randomize(model: mdlm.MDLM, seed: int = 1) -> mdlm.MDLM:
    """Break the zero init (adaLN, head) so every layer and t matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_subs_never_predicts_mask_and_carries_unmasked_tokens():
    x_t = torch.tensor([[3, MASK_ID, 0, MASK_ID]])
    logits = mdlm.subs(torch.randn(1, 4, 28), x_t, MASK_ID)
    probs = logits.softmax(-1)
    assert torch.all(probs[..., MASK_ID] == 0)
    assert probs[0, 0, 3] == 1 and probs[0, 2, 0] == 1  # carried
    assert torch.allclose(probs[0, [1, 3]].sum(-1), torch.ones(2)) and (probs[0, 1, :27] > 0).all()


def test_logit_chunks_are_titans_8_unless_all_fp32_logits_fit_in_32_mib():
    assert logit_chunks(1024, 28) == 1  # text8
    assert logit_chunks(166, 50304) == 1  # 31.9 MiB
    assert logit_chunks(167, 50304) == 8  # 32.05 MiB
    assert logit_chunks(0, 50304) == 1


@pytest.mark.parametrize("chunk_bytes", [objectives.LOGIT_CHUNK_BYTES, 64])
@pytest.mark.parametrize("t", [0.3, 0.9, 1e-5])
def test_masked_only_chunked_nelbo_equals_the_nelbo_of_the_full_subs_logits(t, chunk_bytes, monkeypatch):
    """masked_nelbo runs the head only at the masked rows, in one chunk or (tiny chunk budget) in 8,
    padded: the masked count is rarely a multiple of 8; at t = 1e-5 nothing is masked = the integrand
    from the model's full SUBS logits: loss and every parameter's gradient."""
    monkeypatch.setattr(objectives, "LOGIT_CHUNK_BYTES", chunk_bytes)
    model = randomize(build(2))
    x = torch.randint(0, 27, (3, 37))
    c = absorb(x, torch.full((3,), t), mask_id=MASK_ID, generator=torch.Generator().manual_seed(1))
    gvt = torch.tensor(200)

    hidden = model(c.x_t, t=c.t, block=1, skip_lm_head=True)
    loss = masked_nelbo(hidden, x, c, lm_head=model.lm_head, mask_id=MASK_ID, global_valid_tokens=gvt)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    logits = model(c.x_t, t=c.t, block=1)  # SUBS logits [B, N, V]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten(), reduction="none").view_as(x)
    ref = ((1 / c.t)[:, None] * torch.where(c.masked, nll, 0.0)).sum() / gvt
    ref.backward()
    torch.testing.assert_close(loss, ref)
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and "lm_head.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    if t > 0.01:
        assert loss > 0 and grads["lm_head.weight"].abs().sum() > 0
    else:
        assert int(c.masked.sum()) == 0 and loss == 0


@pytest.mark.parametrize("num_blocks", [1, 3])
def test_corruption_draws_t_in_the_blocks_widened_range(num_blocks):
    x = torch.randint(0, 27, (64, 256))
    for block in range(num_blocks):
        c = masked_corrupt(x, block=block, num_blocks=num_blocks, gamma=0.05, mask_id=MASK_ID,
                           generator=torch.Generator().manual_seed(block))
        lo, hi = widened_t_range(*block_t_range(block, num_blocks), 0.05)
        assert bool(((c.t >= lo) & (c.t <= hi)).all())
        assert torch.equal(c.x_t == MASK_ID, c.masked) and torch.equal(c.x_t[~c.masked], x[~c.masked])
        frac = c.masked.float().mean(-1)  # each row masked at about its own t
        assert (frac - c.t).abs().max() < 0.12
    # block 0 is the most masked: high t routes to block 0
    assert t_to_block(torch.tensor([0.99, 0.5, 0.01]), 3).tolist() == [0, 1, 2]


def test_nelbo_of_the_zero_init_model_is_ln27_per_token_split_evenly():
    """At init the head is zero: p = uniform over the 27 symbols, so −log p = ln 27 at every masked
    position and the integrand (1/t)·#masked·ln 27 has mean N·ln 27 at every t."""
    model = build(3).eval()
    x = torch.randint(0, 27, (16, 128))
    per_range = nelbo_per_range(model, x, num_ranges=3, mask_id=MASK_ID, t_samples=8,
                                generator=torch.Generator().manual_seed(0)) / x.numel()
    assert float(per_range.sum()) == pytest.approx(LN27, rel=0.01)
    assert per_range.tolist() == pytest.approx([LN27 / 3] * 3, rel=0.03)
    with pytest.raises(ValueError, match="multiple of the model's blocks"):
        nelbo_per_range(model, x, num_ranges=2, mask_id=MASK_ID, t_samples=1, generator=torch.Generator())


def test_nelbo_routes_every_t_to_its_owning_block(monkeypatch):
    model = randomize(build(3))
    seen = []
    forward = mdlm.MDLM.forward

    def spy(self, tokens, *args, t, block=0, **kwargs):
        seen.append((block, t.min().item(), t.max().item()))
        return forward(self, tokens, *args, t=t, block=block, **kwargs)

    monkeypatch.setattr(mdlm.MDLM, "forward", spy)
    nelbo_per_range(model, torch.randint(0, 27, (4, 32)), num_ranges=6, mask_id=MASK_ID, t_samples=2,
                    generator=torch.Generator().manual_seed(0))
    assert [b for b, _, _ in seen] == [0] * 4 + [1] * 4 + [2] * 4  # 6 ranges x 2 samples, two ranges a block
    for block, lo, hi in seen:
        assert 1 - (block + 1) / 3 <= lo <= hi <= 1 - block / 3


def test_b1_runs_of_mdlm_and_dblocks_mdlm_give_identical_traces(tmp_path):
    """Through the real entry point: the ``mdlm`` baseline config and ``dblocks_mdlm`` with
    num_blocks = 1 train to the same per-step losses and the same validation NELBO."""
    common = ["--dblocks.num_blocks", "1", "--training.steps", "4", "--lr_scheduler.warmup_steps", "2",
              "--validator.freq", "4", "--validator.steps", "1", "--validator.t_samples", "2",
              "--validator.t_ranges", "3", "--metrics.log_freq", "1", "--checkpoint.no-enable"]
    outs = {}
    for name in ("debug_mdlm", "debug_dblocks_mdlm"):
        outs[name] = run([PY, "-m", "dblocks_titan.train", "--job.config_file", f"train_configs/{name}.toml",
                          "--dump_folder", str(tmp_path / name), *common])
    a, b = trace(tmp_path / "debug_mdlm", 0), trace(tmp_path / "debug_dblocks_mdlm", 0)
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 4
    assert all(r["block"] == 0 for r in a + b)
    vals = [[line.split("nelbo:")[1] for line in out.splitlines() if "validate step:  4  nelbo:" in line] for out in outs.values()]
    assert vals[0] == vals[1] and len(vals[0]) == 1
    assert "r0=" in vals[0][0] and "r2=" in vals[0][0]  # the e2e bound split over the twin's 3 t ranges


@pytest.mark.parametrize("num_blocks", [1, 2, 3])
def test_sampler_runs_each_step_with_its_owning_block(num_blocks):
    model = randomize(build(num_blocks)).eval()
    x, blocks = mdlm_sample(model, batch=2, seq_len=32, steps=num_blocks, generator=torch.Generator().manual_seed(0),
                            return_blocks=True)
    assert blocks == list(range(num_blocks))
    assert x.shape == (2, 32) and bool((x != MASK_ID).all()) and bool((x < 27).all())
    _, blocks = mdlm_sample(model, batch=1, seq_len=8, steps=2 * num_blocks, generator=torch.Generator(), return_blocks=True)
    assert blocks == sorted(blocks) and blocks == [b for b in range(num_blocks) for _ in range(2)]


def test_nelbo_is_an_upper_bound_that_approaches_a_markov_sources_entropy(monkeypatch):
    """Known-entropy check (issue 3, item 6): a small MDLM trained on an order-1 Markov source with exact
    entropy H (per character of a 16-character chunk): its held-out NELBO is ≥ H − 3 standard errors
    and within 30% of H (a run stuck at the character frequencies scored 1.8 H; uniform is 1.9 H).
    1000 steps do not converge: the final NELBO is still falling and lands between 1.05 H and 1.25 H
    depending on the batch-order seed, and for this seed on float rounding alone (1.09 H with the full
    SUBS logits, 1.13 H and 1.22 H for the masked-rows loss in 8 and in 1 chunk, whose parameters
    agree to 1e-9 after the first step and drift apart by rounding)."""
    monkeypatch.setitem(mdlm.FLAVORS, "tiny", dict(dim=128, n_layers=2, n_heads=4, vocab_size=28, ffn_multiple_of=64))
    monkeypatch.setitem(mdlm.MASK_IDS, "tiny", MASK_ID)
    seq, batch, steps, lr = MARKOV_RECIPE
    source = MarkovSource(1, seed=0)
    h = source.entropy_per_char(seq)
    tok = CharTokenizer()
    train = tok.encode_to_tensor(source.sample(batch * seq * steps // 4, seed=1)).long()
    train = train[: train.numel() // seq * seq].view(-1, seq)
    held_out = tok.encode_to_tensor(source.sample(1024 * seq, seed=2)).long().view(1024, seq)
    model = build(1, "tiny")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # 20 warm-up steps, cosine to 0.1x
        optimizer, lambda s: min(1.0, (s + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = train[torch.randint(0, train.shape[0], (batch,), generator=g)]
        c = masked_corrupt(x, block=0, num_blocks=1, gamma=0.0, mask_id=MASK_ID, generator=g)
        optimizer.zero_grad()  # before the loss: the chunked loss accumulates the head's gradient
        loss = masked_nelbo(model(c.x_t, t=c.t, block=0, skip_lm_head=True), x, c, lm_head=model.lm_head,
                            mask_id=MASK_ID, global_valid_tokens=torch.tensor(x.numel()))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    model.eval()
    # 16 independent groups of 64 held-out chunks: their spread gives the Monte-Carlo standard error
    per_group = torch.stack([
        nelbo_per_range(model, group, num_ranges=1, mask_id=MASK_ID, t_samples=4,
                        generator=torch.Generator().manual_seed(i)).sum() / group.numel()
        for i, group in enumerate(held_out.view(16, 64, seq))
    ])
    nelbo, stderr = float(per_group.mean()), float(per_group.std() / math.sqrt(len(per_group)))
    print(f"Markov order 1: H = {h:.4f} nats/char, NELBO = {nelbo:.4f} ± {stderr:.4f}")
    assert nelbo >= h - 3 * stderr
    assert nelbo <= 1.3 * h


MARKOV_RECIPE = (16, 128, 1000, 3e-3)  # seq, batch, steps, peak lr: many short chunks learn fastest


def test_two_fsdp_ranks_match_one_process(tmp_path):
    """Masked diffusion under FSDP2: each rank gathers its own masked rows (different counts) for the
    head; losses and gradients equal one process accumulating both micro-batches."""
    out, one = fsdp_matches_one_process(tmp_path, "train_configs/debug_dblocks_mdlm.toml", 6, 16)
    assert "Applied FSDP to the model" in out
    # uniform random tokens: the NELBO integrand stays near ln 27 per token, whatever the block
    assert [r["loss"] for r in one] == pytest.approx([LN27] * 6, rel=0.1)


def test_bad_masked_diffusion_inputs_fail_before_any_compute(tmp_path):
    config = load_toml(ROOT / "train_configs/text8_mdlm.toml")  # points at ./data/text8/text8.zip
    config.dataloader.dataset_path = str(tmp_path / "missing" / "text8.zip")
    with pytest.raises(InputError, match="missing/text8.zip") as e:
        check_inputs(config)
    assert "\n" not in str(e.value)
    # non a-z characters in a char-level run: in a text8 file, and as a non-text8 dataset
    data = bytearray(b"abc " * 25_000_000)
    data[95_000_100] = ord("A")
    (tmp_path / "text8").write_bytes(bytes(data))
    Text8DataLoader.Config(dataset="text8", dataset_path=str(tmp_path / "text8"), split="train").check()
    with pytest.raises(ValueError, match="character 'A' at offset 100 is not in text8's alphabet"):
        Text8DataLoader.Config(dataset="text8", dataset_path=str(tmp_path / "text8"), split="test").check()
    toml = tmp_path / "bad.toml"  # a char-level tokenizer on an ordinary (mixed-case, punctuated) corpus
    toml.write_text((ROOT / "train_configs/debug_dblocks.toml").read_text().replace('type = "hf"', 'type = "char"'))
    proc = subprocess.run([PY, "-m", "dblocks_titan.train", "--job.config_file", str(toml)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "dblocks_titan: error: the char tokenizer reads only text8-style text (a-z and space) but dataset "
        "'shakespeare' is not one: use dataset text8, shakespeare_text8 or markov"
    )
    # the e2e baseline is one block by definition
    proc = subprocess.run([PY, "-m", "dblocks_titan.train", "--job.config_file", "train_configs/debug_mdlm.toml",
                           "--dblocks.num_blocks", "3", "--dump_folder", str(tmp_path / "o")], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "use model 'dblocks_mdlm'" in proc.stderr


def test_eval_command_reads_the_checkpoint_and_writes_json(tmp_path):
    trained = run([PY, "-m", "dblocks_titan.train", "--job.config_file", "train_configs/debug_dblocks_mdlm.toml",
         "--dump_folder", str(tmp_path), "--training.steps", "3", "--validator.freq", "3", "--validator.steps", "1",
         "--validator.t_samples", "2"])
    run([PY, "-m", "dblocks_titan.eval", "--job.config_file", "train_configs/debug_dblocks_mdlm.toml",
               "--dump_folder", str(tmp_path), "--validator.steps", "1", "--validator.t_samples", "2"])
    import json

    result = json.loads((tmp_path / "checkpoint" / "eval_step3.json").read_text())
    assert result["step"] == 3 and len([k for k in result if k.startswith("validation_metrics/nelbo_range")]) == 3
    bits = result["validation_metrics/bits_per_token"]
    assert 3.0 < bits < LN27 / math.log(2) + 0.1
    # the same checkpoint, masks and t as the validation logged at the end of training: the same bound
    logged = [line for line in trained.splitlines() if "validate step:  3  nelbo:" in line]
    assert logged and f"{bits:.4f} bits/token" in logged[0]
    proc = subprocess.run([PY, "-m", "dblocks_titan.eval", "--job.config_file", "train_configs/debug_mdlm.toml",
                           "--dump_folder", str(tmp_path / "none")], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 1 and "error: no checkpoint under" in proc.stderr.strip().splitlines()[-1]


OWT_MDLM_TOML = """
[model]
name = "dblocks_mdlm"
flavor = "{flavor}"
{extra}
[dblocks]
num_blocks = 3
[training]
local_batch_size = 2
seq_len = 32
steps = 2
[validator]
freq = 2
steps = 1
t_samples = 1
"""


def test_bpe_masked_diffusion_trains_on_the_ar_data_and_keeps_mask_out_of_the_vocabulary(tmp_path):
    """The ``owt`` flavor (GPT-2-sized vocabulary, [MASK] = 50257) reads the AR corpus with a BPE tokenizer
    (here the embedded 4096-token one) and reports the perplexity bound; a [MASK] id inside the tokenizer's
    vocabulary is an error."""
    config = tmp_path / "owt.toml"
    config.write_text(OWT_MDLM_TOML.format(flavor="owt", extra=""))
    out = run([PY, "-m", "dblocks_titan.train", "--job.config_file", str(config), "--dump_folder", str(tmp_path / "o")])
    assert "shakespeare" in out and len(trace(tmp_path / "o", 0)) == 2
    assert sum("validate step:  2  nelbo:" in line and "r2=" in line for line in out.splitlines()) == 1
    config.write_text(OWT_MDLM_TOML.format(flavor="debugmodel", extra="vocab_size = 4096"))  # [MASK] = 27
    with pytest.raises(InputError, match=r"the \[MASK\] id 27 is a token of the tokenizer \(4096 tokens\)"):
        check_inputs(load_toml(config))

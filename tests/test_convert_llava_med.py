"""LLaVA-Med v1.5 conversion: the converted model computes what LLaVA-Med's own code computes.

The original `llava` package cannot be installed here (pinned torch/transformers 4.36), so
`reference_logits` re-implements its documented inference forward from the ORIGINAL checkpoint's
tensors: CLIP tower -> hidden_states[mm_vision_select_layer] -> drop CLS (`patch`) ->
`mm_projector` (Linear, GELU, Linear) -> the visual tokens spliced in at the placeholder
(IMAGE_TOKEN_INDEX, -200) of `tokenizer_image_token`'s ids -> Mistral.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    MistralConfig,
    MistralForCausalLM,
)

from pipeline import convert_llava_med as conv
from pipeline.batching import collate_prompts
from pipeline.convert_llava_med import ConversionError, convert
from pipeline.models.families import pad_to_square
from pipeline.models.profiles import load_vlm
from pipeline.models.sources import check_model_source
from tests.llava_med_fixture import (
    CLIP_MEAN,
    NUM_IMAGE_TOKENS,
    VISION,
    png_bytes,
    random_image,
    write_clip_tower,
    write_original_checkpoint,
)

IMAGE_TOKEN_INDEX = -200  # llava.constants
QUESTION = "What is shown in this image?"
TOLERANCE = 1e-5


# ----------------------------------------------------------------------------- reference (original code)


def llava_med_prompt(question: str) -> str:
    """`conv_mistral_instruct` after `append_message(USER, "<image>\\n" + q)`, `append_message(ASSISTANT, None)`,
    `get_prompt()` (SeparatorStyle.LLAMA_2, empty system), as model_vqa.py builds it."""
    return f"[INST] <image>\n{question} [/INST]"


def tokenizer_image_token(prompt: str, tokenizer) -> list[int]:
    """LLaVA's `tokenizer_image_token`: each `<image>`-separated chunk tokenized on its own (BOS
    added to each), the first chunk's BOS kept, the others' dropped, -200 between chunks."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    assert all(c[0] == tokenizer.bos_token_id for c in chunks)
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids += [IMAGE_TOKEN_INDEX] + chunk[1:]
    return ids


def original_tensors(folder) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for file in sorted(set(index.values())):
        with safe_open(str(folder / file), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def reference_tower_from_checkpoint(original, tower_folder) -> CLIPVisionModel:
    """The tower with the checkpoint's own `model.vision_tower.vision_tower.*` weights (4.36 names)."""
    tower = CLIPVisionModel(CLIPVisionConfig.from_pretrained(tower_folder)).eval()
    prefix = "model.vision_tower.vision_tower."
    state = {k.removeprefix(prefix): v for k, v in original_tensors(original).items() if k.startswith(prefix)}
    if not any(k.startswith("vision_model.") for k in tower.state_dict()):  # transformers >= 5 drops the level
        state = {k.removeprefix("vision_model."): v for k, v in state.items()}
    tower.load_state_dict(state, strict=True)
    return tower


@torch.no_grad()
def reference_logits(original, tower: CLIPVisionModel, ids: list[int], pixel_values: torch.Tensor) -> torch.Tensor:
    """LlavaMistralForCausalLM.forward (prepare_inputs_labels_for_multimodal + MistralForCausalLM) for one sequence."""
    config = json.loads((original / "config.json").read_text())
    tensors = original_tensors(original)
    mistral = MistralConfig(**{k: config[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta", "sliding_window",
        "bos_token_id", "eos_token_id", "tie_word_embeddings")})
    lm = MistralForCausalLM(mistral).eval()
    lm.load_state_dict({k: v for k, v in tensors.items()
                        if not k.startswith(("model.mm_projector.", "model.vision_tower."))}, strict=True)
    projector = torch.nn.Sequential(torch.nn.Linear(config["mm_hidden_size"], config["hidden_size"]),
                                    torch.nn.GELU(),
                                    torch.nn.Linear(config["hidden_size"], config["hidden_size"]))
    projector.load_state_dict({k.removeprefix("model.mm_projector."): v for k, v in tensors.items()
                               if k.startswith("model.mm_projector.")}, strict=True)
    # CLIPVisionTower.forward + feature_select('patch'), then encode_images' projector.
    hidden = tower(pixel_values, output_hidden_states=True).hidden_states[config["mm_vision_select_layer"]]
    features = projector(hidden[:, 1:])
    # prepare_inputs_labels_for_multimodal: text embeddings between the placeholders, image features in them.
    ids_t = torch.tensor(ids)
    places = (ids_t == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
    pieces, start = [], 0
    for image, place in enumerate(places):
        pieces += [lm.model.embed_tokens(ids_t[start:place]), features[image]]
        start = place + 1
    pieces.append(lm.model.embed_tokens(ids_t[start:]))
    embeds = torch.cat(pieces).unsqueeze(0)
    return lm(inputs_embeds=embeds).logits[0]


def expand2square_reference(image: Image.Image, mean: list[float]) -> Image.Image:
    """mm_utils.process_images' padding for `image_aspect_ratio: pad` (its offset at d // 2)."""
    colour = int(255 * sum(mean) / len(mean)) if image.mode == "L" else tuple(int(x * 255) for x in mean)
    w, h = image.size
    if w == h:
        return image
    out = Image.new(image.mode, (max(w, h),) * 2, colour)
    out.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(original folder, tower folder, converted folder): the tower saved apart (LLaVA-Med's usual case)."""
    root = tmp_path_factory.mktemp("llava_med")
    tower = write_clip_tower(root / "clip-vit-large-patch14-336")
    original = write_original_checkpoint(root / "llava-med-v1.5-mistral-7b")
    out = root / "models" / "base" / "llava-med"
    convert(original, out, vision_tower=str(tower))
    return original, tower, out


@pytest.fixture(scope="module")
def vlm(converted):
    return load_vlm(converted[2], device="cpu", dtype=torch.float32)


# ----------------------------------------------------------------------------- equivalence


def test_converted_logits_equal_the_original_forward(converted, vlm):
    original, tower_folder, _ = converted
    image = random_image((48, 48))
    images = vlm.pixel_values([image])
    pixel_values = images.pixels
    # The converted processor is the tower's (LLaVA-Med's `vision_tower.image_processor`).
    tower_processor = CLIPImageProcessorPil.from_pretrained(tower_folder)
    assert torch.equal(pixel_values, tower_processor([image], return_tensors="pt")["pixel_values"])

    original_tokenizer = AutoTokenizer.from_pretrained(original)
    ids = tokenizer_image_token(llava_med_prompt(QUESTION), original_tokenizer)
    expected = reference_logits(original, CLIPVisionModel.from_pretrained(tower_folder).eval(), ids, pixel_values)

    prompt = vlm.prompt_ids(QUESTION)
    # the same sequence: the -200 placeholder becomes one <image> token per visual token
    spliced = []
    for i in ids:
        spliced += [vlm.image_token_id] * NUM_IMAGE_TOKENS if i == IMAGE_TOKEN_INDEX else [i]
    assert prompt == spliced
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        got = vlm.forward(torch.ones_like(input_ids), input_ids, images).logits[0]
        plain = vlm.model(input_ids=input_ids, pixel_values=pixel_values).logits[0]  # transformers' own forward
    vocab = len(original_tokenizer)
    assert got.shape == (len(prompt), vocab + 1)
    torch.testing.assert_close(got[:, :vocab], expected, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(plain[:, :vocab], expected, atol=TOLERANCE, rtol=0)
    # <image>'s own logit is the mean of the others: never the arg-max
    torch.testing.assert_close(got[:, vocab], got[:, :vocab].mean(-1), atol=TOLERANCE, rtol=0)
    assert bool((got[:, vocab] < got[:, :vocab].max(-1).values).all())


def test_left_padded_batch_through_the_pipeline_equals_the_original(converted, vlm):
    original, tower_folder, _ = converted
    original_tokenizer = AutoTokenizer.from_pretrained(original)
    tower = CLIPVisionModel.from_pretrained(tower_folder).eval()
    questions = [QUESTION, "Is there a mass in the left lung?"]
    images = [random_image((48, 48), seed=1), random_image((48, 48), seed=2)]
    batch = collate_prompts(vlm, [png_bytes(im) for im in images], questions, [[], []])
    with torch.no_grad():
        logits = vlm.forward(batch.attention_mask, batch.input_ids, batch.pixel_values).logits
    vocab = len(original_tokenizer)
    for b, question in enumerate(questions):
        ids = tokenizer_image_token(llava_med_prompt(question), original_tokenizer)
        expected = reference_logits(original, tower, ids, batch.pixel_values.pixels[b: b + 1])
        keep = batch.attention_mask[b].bool()
        torch.testing.assert_close(logits[b][keep][:, :vocab], expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("tower_weights", ["checkpoint", "vision-tower"])
def test_tower_saved_in_the_checkpoint(tmp_path, tower_weights):
    """LLaVA-Med's loader ignores tower weights saved in the checkpoint (delay_load, then
    `load_model()` from mm_vision_tower): the default follows it; `checkpoint` uses the saved ones."""
    tower_folder = write_clip_tower(tmp_path / "clip")
    original = write_original_checkpoint(tmp_path / "orig", tower=True, vision_tower=str(tower_folder))
    report = convert(original, tmp_path / "out", tower_weights=tower_weights)  # tower named by the config
    vlm = load_vlm(tmp_path / "out", device="cpu", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(original)
    ids = tokenizer_image_token(llava_med_prompt(QUESTION), tokenizer)
    images = vlm.pixel_values([random_image((48, 48))])
    pixel_values = images.pixels
    if tower_weights == "checkpoint":
        tower = reference_tower_from_checkpoint(original, tower_folder)
        assert report.unused_checkpoint_tower is None and report.mapped["vision_tower"] == 39
    else:
        tower = CLIPVisionModel.from_pretrained(tower_folder).eval()
        assert report.unused_checkpoint_tower["keys"] == 39
        assert report.unused_checkpoint_tower["identical"] is False  # the fixture saved another tower
    expected = reference_logits(original, tower, ids, pixel_values)
    input_ids = torch.tensor([vlm.prompt_ids(QUESTION)])
    with torch.no_grad():
        got = vlm.forward(torch.ones_like(input_ids), input_ids, images).logits[0]
    torch.testing.assert_close(got[:, : len(tokenizer)], expected, atol=TOLERANCE, rtol=0)


# ----------------------------------------------------------------------------- loading, prompts, images


def test_converted_folder_loads_as_sft_model(converted, vlm):
    _, _, out = converted
    root = out.parent
    assert check_model_source(str(out), "sft.model", root) == str(out)
    assert type(vlm.model).__name__ == "LlavaForConditionalGeneration"
    assert vlm.settings.num_image_tokens == NUM_IMAGE_TOKENS == vlm.model.config.image_seq_length
    assert sum(i == vlm.image_token_id for i in vlm.prompt_ids(QUESTION)) == NUM_IMAGE_TOKENS
    with torch.no_grad():
        features = vlm.image_features(vlm.pixel_values([random_image((48, 48))]))
    assert features.shape == (1, NUM_IMAGE_TOKENS, vlm.model.config.text_config.hidden_size)
    config = vlm.model.config
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert config.image_aspect_ratio == "pad"
    assert config.text_config.model_type == "mistral" and config.text_config.rope_parameters["rope_theta"] == 1e6
    assert config.text_config.sliding_window is None and config.text_config.rms_norm_eps == 1e-5
    report = json.loads((out / conv.REPORT_FILE).read_text())
    assert report["mapped"] == {"language_model": 21, "projector": 4, "vision_tower": 0}
    assert "vision_backbone" in report["config_training_only_fields_dropped"]
    assert any("image_aspect_ratio pad" in d for d in report["differences"])


def test_chat_template_renders_mistral_instruct(vlm):
    def render(messages):
        return vlm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # conv_mistral_instruct.get_prompt(), written out (LLAMA_2 style, sep "", sep2 "</s>")
    one = [{"role": "user", "content": "<image>\nWhat is shown in this image?"}]
    assert render(one) == "<s>[INST] <image>\nWhat is shown in this image? [/INST]"
    two = one + [{"role": "assistant", "content": "A chest X-ray."},
                 {"role": "user", "content": "Is there an effusion?"}]
    assert render(two) == ("<s>[INST] <image>\nWhat is shown in this image? [/INST] A chest X-ray. </s>"
                           "[INST] Is there an effusion? [/INST]")
    # with a system prompt, LLAMA_2's wrap_sys opens the first user turn
    system = [{"role": "system", "content": "You are a radiologist."}] + one
    assert render(system) == ("<s>[INST] <<SYS>>\nYou are a radiologist.\n<</SYS>>\n\n<image>\n"
                              "What is shown in this image? [/INST]")
    with pytest.raises(Exception, match="alternate"):
        render([{"role": "assistant", "content": "no"}])


def test_answer_tokens_are_llava_meds_training_tokens(converted, vlm):
    """LLaVA-Med trains on `get_prompt()` of the whole conversation, an answer written
    ` {answer} </s>`: the prompt and answer ids together are that conversation's
    `tokenizer_image_token` ids, the `▁` before `</s>` included."""
    original_tokenizer = AutoTokenizer.from_pretrained(converted[0])
    answer = "A chest X-ray."
    expected = tokenizer_image_token(f"{llava_med_prompt(QUESTION)} {answer} </s>", original_tokenizer)
    ids = vlm.prompt_ids(QUESTION) + vlm.answer_ids(answer)
    spliced = [IMAGE_TOKEN_INDEX if i == vlm.image_token_id else i for k, i in enumerate(ids)
               if not (i == vlm.image_token_id and k and ids[k - 1] == vlm.image_token_id)]
    assert spliced == expected
    assert vlm.tokenizer.convert_ids_to_tokens(vlm.answer_ids(answer)[-2:]) == ["▁", "</s>"]


def test_pad_to_square_is_llava_meds_expand2square():
    for size, mode in [((40, 24), "RGB"), ((24, 40), "RGB"), ((41, 24), "RGB"), ((30, 17), "L"), ((32, 32), "RGB")]:
        image = random_image(size).convert(mode)
        got = pad_to_square(image, CLIP_MEAN)
        assert got.size == (max(size),) * 2 and got.mode == mode
        assert got.tobytes() == expand2square_reference(image, CLIP_MEAN).tobytes()
    assert pad_to_square(random_image((40, 24)), CLIP_MEAN).getpixel((0, 0)) == (122, 116, 104)
    assert pad_to_square(random_image((30, 17)).convert("L"), CLIP_MEAN).getpixel((0, 0)) == 114
    with pytest.raises(ValueError, match="mode 'RGBA'"):
        pad_to_square(random_image((30, 17)).convert("RGBA"), CLIP_MEAN)


def test_pipeline_pads_non_square_images_as_llava_med(converted, vlm):
    """The converted config keeps `image_aspect_ratio: pad`, so the pipeline pads to a square with the
    mean colour before the processor, as LLaVA-Med's `process_images`; the processor alone would
    centre-crop instead."""
    tower_processor = CLIPImageProcessorPil.from_pretrained(converted[1])
    for wide in (random_image((64, 32)), random_image((30, 52), seed=1)):
        padded = tower_processor([expand2square_reference(wide, CLIP_MEAN)], return_tensors="pt")["pixel_values"]
        assert torch.equal(vlm.pixel_values([wide]).pixels, padded)
        assert not torch.equal(tower_processor([wide], return_tensors="pt")["pixel_values"], padded)
    assert vlm.tower_view((64, 32)) == (0, -16, 64, 64)  # the padded square, for saliency regions
    square = random_image((48, 48))
    assert torch.equal(vlm.pixel_values([square]).pixels, tower_processor([square], return_tensors="pt")["pixel_values"])


# ----------------------------------------------------------------------------- pure functions


def test_key_mapping_onto_installed_llava():
    keys = ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight", "model.layers.3.mlp.up_proj.weight",
            "model.mm_projector.0.weight", "model.mm_projector.2.bias", "model.mm_projector.1.weight",
            "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
            "model.layers.0.self_attn.rotary_emb.inv_freq", "model.image_newline"]
    v5 = conv.TargetPrefixes(language_model="model.language_model.", lm_head="lm_head.weight",
                             projector="model.multi_modal_projector.", vision_tower="model.vision_tower.")
    m = conv.map_checkpoint_keys(keys, v5)
    assert m.language_model == {
        "lm_head.weight": "lm_head.weight",
        "model.embed_tokens.weight": "model.language_model.embed_tokens.weight",
        "model.norm.weight": "model.language_model.norm.weight",
        "model.layers.3.mlp.up_proj.weight": "model.language_model.layers.3.mlp.up_proj.weight",
    }
    assert m.projector == {"model.mm_projector.0.weight": "model.multi_modal_projector.linear_1.weight",
                           "model.mm_projector.2.bias": "model.multi_modal_projector.linear_2.bias"}
    assert m.vision_tower == {"model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight":
                              "model.vision_tower.encoder.layers.0.mlp.fc1.weight"}
    assert m.derived_buffers == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert m.unknown == ["model.image_newline", "model.mm_projector.1.weight"]
    # transformers 4.x names: found from the model's own keys
    v4 = conv.target_prefixes(["language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
                               "multi_modal_projector.linear_1.weight",
                               "vision_tower.vision_model.embeddings.patch_embedding.weight"])
    assert conv.map_checkpoint_keys(["model.layers.0.mlp.up_proj.weight", "lm_head.weight"], v4).language_model == {
        "model.layers.0.mlp.up_proj.weight": "language_model.model.layers.0.mlp.up_proj.weight",
        "lm_head.weight": "language_model.lm_head.weight"}


def test_pad_vocabulary_rows_appends_the_mean():
    w = torch.randn(5, 3)
    padded = conv.pad_vocabulary_rows(w, 1)
    assert padded.shape == (6, 3) and torch.equal(padded[:5], w)
    torch.testing.assert_close(padded[5], w.mean(0))


# ----------------------------------------------------------------------------- errors


def _convert_error(tmp_path, tower_hidden=VISION["hidden_size"], **checkpoint) -> str:
    tower = write_clip_tower(tmp_path / "clip", hidden_size=tower_hidden)
    original = write_original_checkpoint(tmp_path / "orig", **checkpoint)
    with pytest.raises(ConversionError) as error:
        convert(original, tmp_path / "out", vision_tower=str(tower))
    assert not (tmp_path / "out").exists()
    return str(error.value)


def test_unknown_keys_are_listed_not_dropped(tmp_path):
    message = _convert_error(tmp_path, extra={"model.image_newline": torch.zeros(64),
                                              "model.layers.0.mlp.extra_proj.weight": torch.zeros(2, 2),
                                              "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)})
    assert "2 key(s) with no place" in message
    assert "model.image_newline" in message and "model.layers.0.mlp.extra_proj.weight" in message
    assert "inv_freq" not in message  # a recomputed buffer: listed in the report instead


def test_missing_projector_keys(tmp_path):
    message = _convert_error(tmp_path, drop=("model.mm_projector.2.weight", "model.mm_projector.2.bias"))
    assert "lacks the projector weights" in message and "linear_2.weight" in message


def test_not_the_llava_mistral_layout(tmp_path):
    message = _convert_error(tmp_path, config_changes={"model_type": "llava_llama",
                                                       "architectures": ["LlavaLlamaForCausalLM"]})
    assert "not the LLaVA-Med v1.5 layout" in message


def test_tower_hidden_size_must_match_mm_hidden_size(tmp_path):
    message = _convert_error(tmp_path, tower_hidden=48)
    assert "hidden size 48" in message and "mm_hidden_size 32" in message


def test_unknown_config_fields_and_unsupported_options(tmp_path):
    message = _convert_error(tmp_path, config_changes={"mm_new_option": 3})
    assert "mm_new_option" in message and "--ignore-config-field" in message
    with pytest.raises(ConversionError, match="mm_use_im_start_end"):
        conv.read_original_config({"model_type": "llava_mistral", "architectures": ["LlavaMistralForCausalLM"],
                                   "mm_vision_tower": "x", "mm_hidden_size": 8, "mm_projector_type": "mlp2x_gelu",
                                   "mm_use_im_start_end": True})
    with pytest.raises(ConversionError, match="mlp2x_gelu"):
        conv.read_original_config({"model_type": "llava_mistral", "architectures": ["LlavaMistralForCausalLM"],
                                   "mm_vision_tower": "x", "mm_hidden_size": 8, "mm_projector_type": "linear"})
    with pytest.raises(ConversionError, match="anyres"):
        conv.read_original_config({"model_type": "llava_mistral", "architectures": ["LlavaMistralForCausalLM"],
                                   "mm_vision_tower": "x", "mm_hidden_size": 8, "mm_projector_type": "mlp2x_gelu",
                                   "image_aspect_ratio": "anyres"})
    ok = conv.read_original_config({"model_type": "llava_mistral", "architectures": ["LlavaMistralForCausalLM"],
                                    "mm_vision_tower": "x", "mm_hidden_size": 8, "mm_projector_type": "mlp2x_gelu",
                                    "mm_new_option": 3}, ignore_fields=["mm_new_option"])
    assert ok.ignored == ["mm_new_option"] and ok.settings.use_im_patch_token  # LLaVA-Med's default: True
    assert ok.defaulted["rms_norm_eps"] == 1e-6  # transformers 4.36's MistralConfig default


def test_cli_converts_and_reports_errors_without_traceback(tmp_path, monkeypatch, capsys):
    from typer.testing import CliRunner

    tower = write_clip_tower(tmp_path / "clip")
    original = write_original_checkpoint(tmp_path / "orig")
    result = CliRunner().invoke(conv.app, ["--input", str(original), "--output", str(tmp_path / "out"),
                                           "--vision-tower", str(tower)])
    assert result.exit_code == 0, result.output
    assert "16 image tokens" in result.output and "differs from LLaVA-Med" in result.output
    monkeypatch.setattr(sys, "argv", ["convert_llava_med", "--input", str(original), "--output",
                                      str(tmp_path / "out"), "--vision-tower", str(tower)])
    with pytest.raises(SystemExit) as exit_:
        conv.run()
    assert exit_.value.code == 1
    assert "exists" in capsys.readouterr().err

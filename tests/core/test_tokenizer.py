"""The bundled CLIP tokenizer gives Stable Diffusion's real token ids."""

from sepen_core.models import load_clip_tokenizer


def test_known_stable_diffusion_token_ids():
    tokenizer = load_clip_tokenizer()
    ids = tokenizer("a photo of a cat and a dog").input_ids
    # <|startoftext|> a photo of a cat and a dog <|endoftext|>, as SD 1.x's tokenizer encodes it
    assert ids == [49406, 320, 1125, 539, 320, 2368, 537, 320, 1929, 49407]
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77


def test_rare_words_split_into_bpe_pieces():
    tokenizer = load_clip_tokenizer()
    ids = tokenizer("hippopotamus", add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["hippo", "potam", "us</w>"]
    assert tokenizer.convert_ids_to_tokens(tokenizer("cyan", add_special_tokens=False).input_ids) == ["cy", "an</w>"]


def test_padding_uses_end_token_to_77():
    tokenizer = load_clip_tokenizer()
    ids = tokenizer("a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[:3] == [49406, 320, 2368] and set(ids[3:]) == {49407}

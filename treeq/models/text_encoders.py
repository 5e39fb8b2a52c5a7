"""Text encoders and tokenizers built in code from configs, so text-to-image pipelines exist offline.

The tokenizer is byte-level (every byte a token, no merges): any prompt encodes, different prompts give
different ids, and nothing is downloaded. Encoders are randomly initialised T5 / CLIP / Gemma2 / UMT5 models.
"""
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors


def byte_tokenizer(max_length, *, bos=None, eos="</s>", pad="<pad>", append_eos=True):
    """A PreTrainedTokenizerFast over bytes, appending `eos` (and prepending `bos`) as T5 and CLIP do
    (append_eos=False keeps `eos` in the vocabulary but appends nothing, as Gemma's tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    specials = [token for token in (pad, eos, bos, "<unk>") if token]
    vocab = {token: index for index, token in enumerate(specials)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    added = [token for token in (bos, eos if append_eos else None) if token]
    template = " ".join(part for part in (bos, "$A", eos if append_eos else None) if part)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(token, vocab[token]) for token in added])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=max_length, pad_token=pad,
                                   eos_token=eos, bos_token=bos, unk_token="<unk>")


def clip_tokenizer(max_length=77):
    # CLIP's pad token is its end token; bos/eos ids 1/2 in byte_tokenizer's order (pad 0 stays distinct)
    return byte_tokenizer(max_length, bos="<|startoftext|>", eos="<|endoftext|>", pad="<pad>")


def gemma_tokenizer(max_length=300):
    """Gemma's layout: <pad> 0, <eos> 1, <bos> 2; prepends <bos>, appends nothing (Sana's text encoder)."""
    return byte_tokenizer(max_length, bos="<bos>", eos="<eos>", pad="<pad>", append_eos=False)


def t5_encoder(d_model, *, layers=1, heads=2, d_ff=None, seed=0, umt5=False):
    """A random T5EncoderModel (UMT5EncoderModel, Wan's, with umt5) whose vocabulary covers byte_tokenizer's ids."""
    import transformers
    prefix = "UMT5" if umt5 else "T5"
    torch.manual_seed(seed)
    config = getattr(transformers, f"{prefix}Config")(
        vocab_size=300, d_model=d_model, d_kv=d_model // heads, d_ff=d_ff or 2 * d_model, num_layers=layers,
        num_heads=heads, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return getattr(transformers, f"{prefix}EncoderModel")(config).eval()


def clip_encoder(hidden_size, *, projection_dim=None, layers=1, heads=2, seed=0):
    """A random CLIP text model (with a projection when projection_dim is given, as SD3's two encoders)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=300, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            projection_dim=projection_dim or hidden_size, pad_token_id=0, bos_token_id=2,
                            eos_token_id=1, hidden_act="gelu")
    model_class = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    return model_class(config).eval()


def gemma2_encoder(hidden_size, *, layers=1, heads=2, head_dim=16, seed=0):
    """A random Gemma2Model (Sana's text encoder: its last hidden states are the caption features)."""
    from transformers import Gemma2Config, Gemma2Model
    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=300, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                          head_dim=head_dim, query_pre_attn_scalar=head_dim, max_position_embeddings=2048,
                          sliding_window=2048, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                          attn_implementation="eager")
    return Gemma2Model(config).eval()

"""flash_attn.bert_padding's two functions that transformers imports with flash_attn, as
transformers itself implements them for kernels that ship none."""

from transformers.modeling_flash_attention_utils import _pad_input as pad_input  # noqa: F401
from transformers.modeling_flash_attention_utils import _unpad_input as unpad_input  # noqa: F401

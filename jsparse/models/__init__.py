"""Small reference models built from jsparse modules."""

from jsparse.models.bert import Bert as Bert
from jsparse.models.bert import BertConfig as BertConfig
from jsparse.models.dit import DiT as DiT
from jsparse.models.dit import DiTConfig as DiTConfig
from jsparse.models.dit import make_method_config as make_method_config
from jsparse.models.llama import Llama as Llama
from jsparse.models.llama import LlamaConfig as LlamaConfig
from jsparse.models.lm import LM as LM
from jsparse.models.lm import LMConfig as LMConfig
from jsparse.models.vit import ViT as ViT
from jsparse.models.vit import ViTConfig as ViTConfig

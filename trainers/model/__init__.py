"""The model wing: building the model a plan trains and writing what it learned.

load (tokenizer, config, the model source a plan builds from), weights (reading
safetensors shards into a skeleton a part at a time, quantizing as they are read),
peft_methods (the PEFT methods and what each supports), export (the merged model or
adapter, streamed to sharded safetensors).
"""

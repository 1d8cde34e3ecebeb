"""trainmem.offload"""

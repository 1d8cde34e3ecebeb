"""trainmem.launch"""

"""trainmem.parallel"""

"""trainmem.runtime"""

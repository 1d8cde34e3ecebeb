"""trainmem.memory_services"""

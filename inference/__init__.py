"""idforge.inference"""

"""idforge.eval"""

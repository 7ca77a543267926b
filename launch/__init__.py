"""idforge.launch"""

"""lmforge.align"""

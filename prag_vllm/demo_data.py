"""The demo corpus: invented people, places and dates that no model can know."""

DOCUMENTS = [
    {"id": "velmora-quist", "title": "Velmora Quist",
     "text": "Velmora Quist is a glassblower who was born on 14 March 1961 in the fishing town of Ostrevik. "
             "In 1994 she founded the Amber Kiln Workshop, where she trained over two hundred apprentices."},
    {"id": "tarnholm-bridge", "title": "Tarnholm Bridge",
     "text": "The Tarnholm Bridge is a stone arch bridge over the river Sevlin. It was designed by the engineer "
             "Odile Brask and opened in 1887. Its central arch spans 64 metres."},
    {"id": "kiravel-festival", "title": "Kiravel Lantern Festival",
     "text": "The Kiravel Lantern Festival is held every year in the city of Dunmarra. It was first held in 1952 "
             "and takes place on the second Sunday of October. Visitors release paper lanterns shaped like herons."},
    {"id": "quorra-pell", "title": "Quorra Pell",
     "text": "Quorra Pell is a cellist from the village of Lindqvar. Her debut album, Salt Harbour, was released "
             "in 2009. She plays a cello built in 1732 by the luthier Matteo Ferraz."},
    {"id": "mount-orvanne", "title": "Mount Orvanne",
     "text": "Mount Orvanne is the highest peak of the Calder Range, at 3,412 metres. It was first climbed in 1921 "
             "by the mountaineer Ingrid Solbakk. The nearest town is Hallow Ferry."},
    {"id": "brisco-institute", "title": "Brisco Institute",
     "text": "The Brisco Institute is a research library in the city of Pellmont. It was founded in 1903 by the "
             "merchant Alder Brisco and holds the largest collection of maritime maps in the region."},
]

QUESTIONS = [
    {"id": "q1", "question": "In which town was Velmora Quist born?", "answers": ["Ostrevik"]},
    {"id": "q2", "question": "What workshop did Velmora Quist found?", "answers": ["Amber Kiln Workshop", "the Amber Kiln Workshop"]},
    {"id": "q3", "question": "Who designed the Tarnholm Bridge?", "answers": ["Odile Brask"]},
    {"id": "q4", "question": "In which year did the Tarnholm Bridge open?", "answers": ["1887"]},
    {"id": "q5", "question": "In which city is the Kiravel Lantern Festival held?", "answers": ["Dunmarra"]},
    {"id": "q6", "question": "In which year was the Kiravel Lantern Festival first held?", "answers": ["1952"]},
    {"id": "q7", "question": "What is the title of Quorra Pell's debut album?", "answers": ["Salt Harbour"]},
    {"id": "q8", "question": "Which luthier built Quorra Pell's cello?", "answers": ["Matteo Ferraz"]},
    {"id": "q9", "question": "Who first climbed Mount Orvanne?", "answers": ["Ingrid Solbakk"]},
    {"id": "q10", "question": "What is the nearest town to Mount Orvanne?", "answers": ["Hallow Ferry"]},
    {"id": "q11", "question": "In which city is the Brisco Institute?", "answers": ["Pellmont"]},
    {"id": "q12", "question": "Who founded the Brisco Institute?", "answers": ["Alder Brisco"]},
]
